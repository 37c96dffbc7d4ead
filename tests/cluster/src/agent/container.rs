//! One container's life inside its pod: start the process (through the `exec-in-pod` helper),
//! run its startup, readiness and liveness probes, restart it by the pod's restartPolicy with
//! back-off, and on stop send SIGTERM, wait the grace period, then SIGKILL its process group.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Container;
use k8s_openapi::jiff::Timestamp;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::{watch, Notify};
use tokio::time::{sleep, sleep_until, Instant};
use tracing::{info, warn};

use super::exec::ExecInPod;
use super::probe::{self, Timing, Verdict};
use super::status::{Phase, PodRuntime};

/// Everything needed to start the container's process.
pub struct Launch {
    pub helper: ExecInPod,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
}

/// Where the container sits in its pod and how to tell the pod worker about changes.
pub struct Handle {
    pub index: usize,
    pub pod: String,
    pub pod_ip: String,
    pub runtime: Arc<Mutex<PodRuntime>>,
    pub changed: Arc<Notify>,
    pub http: reqwest::Client,
    pub agent_exe: PathBuf,
}

impl Handle {
    fn update(&self, f: impl FnOnce(&mut super::status::ContainerRuntime)) {
        f(&mut self.runtime.lock().unwrap().containers[self.index]);
        self.changed.notify_one();
    }
}

/// `stop` carries the grace period once the pod is stopping.
pub async fn supervise(
    h: Handle,
    c: Container,
    launch: Launch,
    restart_policy: String,
    mut stop: watch::Receiver<Option<Duration>>,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        if stop.borrow().is_some() {
            return;
        }
        let started_at = Timestamp::now();
        let began = Instant::now();
        let (status, stopped) = match spawn(&h, &launch) {
            Ok(child) => {
                let pid = child.id();
                info!(pod = %h.pod, container = %c.name, ?pid, "started");
                let no_readiness = c.readiness_probe.is_none() && c.startup_probe.is_none();
                h.update(|r| {
                    r.phase = Phase::Running { started_at };
                    r.pid = pid;
                    r.ready = no_readiness;
                });
                run(&h, &c, child, &mut stop).await
            }
            Err(e) => {
                warn!(pod = %h.pod, container = %c.name, "cannot start: {e:#}");
                h.update(|r| {
                    r.phase = Phase::Waiting {
                        reason: "RunContainerError".into(),
                        message: Some(format!("{e:#}")),
                    }
                });
                (ExitStatus::from_raw(128 << 8), false)
            }
        };
        let code = status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        let restart = !stopped
            && match restart_policy.as_str() {
                "Never" => false,
                "OnFailure" => code != 0,
                _ => true,
            };
        let term = Phase::Terminated {
            exit_code: code,
            signal: status.signal(),
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            started_at,
            finished_at: Timestamp::now(),
        };
        info!(pod = %h.pod, container = %c.name, code, restart, "exited");
        h.update(|r| {
            r.phase = term.clone();
            r.last_terminated = Some(term.clone());
            r.ready = false;
            r.pid = None;
            r.will_restart = restart;
        });
        if !restart {
            return;
        }
        // Back-off as a kubelet does (10 s doubling to 5 min there; shorter here, for tests),
        // reset once the container has stayed up a while.
        if began.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        h.update(|r| {
            r.phase = Phase::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: Some(format!(
                    "back-off {}s restarting failed container={}",
                    backoff.as_secs(),
                    c.name
                )),
            }
        });
        tokio::select! {
            _ = sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
        h.update(|r| r.restart_count += 1);
    }
}

fn spawn(h: &Handle, l: &Launch) -> anyhow::Result<tokio::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&l.log)?;
    Ok(tokio::process::Command::new(&h.agent_exe)
        .args(l.helper.to_args())
        .env_clear()
        .envs(l.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()?)
}

/// Runs the probes until the process exits or the pod stops. Returns the exit status and
/// whether it ended because the pod is stopping.
async fn run(
    h: &Handle,
    c: &Container,
    mut child: tokio::process::Child,
    stop: &mut watch::Receiver<Option<Duration>>,
) -> (ExitStatus, bool) {
    let pid = child.id().unwrap_or(0) as i32;
    let now = Instant::now();
    let timing = |p: &Option<k8s_openapi::api::core::v1::Probe>| p.as_ref().map(Timing::of);
    let (st, rt, lt) = (
        timing(&c.startup_probe),
        timing(&c.readiness_probe),
        timing(&c.liveness_probe),
    );
    let mut started = st.is_none();
    let mut startup_v = Verdict::new(false);
    let mut ready_v = Verdict::new(false);
    let mut live_v = Verdict::new(true);
    let at = |t: &Option<Timing>| now + t.map_or(Duration::ZERO, |t| t.initial_delay);
    let (mut next_s, mut next_r, mut next_l) = (at(&st), at(&rt), at(&lt));
    let grace_default = Duration::from_secs(30);
    loop {
        tokio::select! {
            s = child.wait() => {
                let status = s.unwrap_or(ExitStatus::from_raw(1 << 8));
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                return (status, false);
            }
            _ = sleep_until(next_s), if !started => {
                let t = st.unwrap();
                let r = probe::run(c.startup_probe.as_ref().unwrap(), c, &h.pod_ip, &h.http).await;
                startup_v.record(r.is_ok(), &t);
                // A startup probe fails the container after failureThreshold failures in a row.
                if startup_v.ok {
                    started = true;
                    (next_r, next_l) = (Instant::now(), Instant::now());
                    if rt.is_none() {
                        h.update(|r| r.ready = true);
                    }
                } else if startup_v.consecutive_failures() >= t.failure_threshold {
                    warn!(pod = %h.pod, container = %c.name, "startup probe failed: {}", r.unwrap_err());
                    return (terminate(&mut child, pid, grace_default).await, false);
                }
                next_s += t.period;
            }
            _ = sleep_until(next_r), if started && rt.is_some() => {
                let t = rt.unwrap();
                let r = probe::run(c.readiness_probe.as_ref().unwrap(), c, &h.pod_ip, &h.http).await;
                if ready_v.record(r.is_ok(), &t) {
                    info!(pod = %h.pod, container = %c.name, ready = ready_v.ok, "readiness changed{}", r.err().map(|e| format!(": {e}")).unwrap_or_default());
                    let ok = ready_v.ok;
                    h.update(|r| r.ready = ok);
                }
                next_r += t.period;
            }
            _ = sleep_until(next_l), if started && lt.is_some() => {
                let t = lt.unwrap();
                let r = probe::run(c.liveness_probe.as_ref().unwrap(), c, &h.pod_ip, &h.http).await;
                if live_v.record(r.is_ok(), &t) && !live_v.ok {
                    warn!(pod = %h.pod, container = %c.name, "liveness probe failed, restarting: {}", r.unwrap_err());
                    return (terminate(&mut child, pid, grace_default).await, false);
                }
                next_l += t.period;
            }
            _ = stop.changed() => {
                let grace = stop.borrow().unwrap_or(grace_default);
                return (terminate(&mut child, pid, grace).await, true);
            }
        }
    }
}

/// SIGTERM to the container's main process, the grace period, then SIGKILL to its group.
pub async fn terminate(child: &mut tokio::process::Child, pid: i32, grace: Duration) -> ExitStatus {
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(Ok(s)) => s,
        _ => {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            child
                .wait()
                .await
                .unwrap_or(ExitStatus::from_raw(Signal::SIGKILL as i32))
        }
    };
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    status
}
