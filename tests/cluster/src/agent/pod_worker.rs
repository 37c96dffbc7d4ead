//! One pod on one of our nodes, from binding to deletion: admit it (GPUs), give it a network
//! namespace, resolve its config (Secrets, ConfigMaps, volumes, env), start a supervisor per
//! container, write its status back, and when it is deleted stop the containers within the
//! grace period, tear the sandbox down and remove the pod object (as a kubelet does).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodCondition, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::Api;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::container::{self, Launch};
use super::exec::ExecInPod;
use super::network::Sandbox;
use super::pod_spec::{self, Lookups, PodFacts, VolumeContent};
use super::status::{self, ContainerRuntime, Phase, PodRuntime};
use super::Ctx;

pub enum PodEvent {
    Updated(Box<Pod>),
    /// The object is gone from the API (force-deleted): stop quickly.
    Deleted,
    /// The agent is shutting down: stop the processes, leave the object alone.
    Shutdown,
}

enum Stage {
    Admit,
    Sandbox,
    Start,
    Running,
    Failed,
}

struct Worker {
    ctx: Arc<Ctx>,
    pod: Pod,
    node: String,
    api: Api<Pod>,
    name: String,
    uid: String,
    key: String,
    dir: PathBuf,
    runtime: Arc<Mutex<PodRuntime>>,
    changed: Arc<Notify>,
    conditions: Vec<PodCondition>,
    status_dirty: bool,
    gpus: Vec<u32>,
    sandbox: Option<Sandbox>,
    stop: watch::Sender<Option<Duration>>,
    supervisors: Vec<JoinHandle<()>>,
    last_error: Option<String>,
}

pub async fn run(
    ctx: Arc<Ctx>,
    pod: Pod,
    node: String,
    mut events: mpsc::UnboundedReceiver<PodEvent>,
) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let containers = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| ContainerRuntime::new(&c.name, c.image.as_deref().unwrap_or("")))
        .collect();
    let runtime = PodRuntime {
        containers,
        host_ip: Some(ctx.host_ip.clone()),
        start_time: Some(Timestamp::now()),
        ..Default::default()
    };
    let mut w = Worker {
        api: Api::namespaced(ctx.client.clone(), &ns),
        dir: ctx.pods_dir.join(format!("{ns}_{name}_{uid}")),
        key: format!("{ns}/{name}"),
        conditions: pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default(),
        ctx,
        pod,
        node,
        name,
        uid,
        runtime: Arc::new(Mutex::new(runtime)),
        changed: Arc::new(Notify::new()),
        status_dirty: true,
        gpus: Vec::new(),
        sandbox: None,
        stop: watch::channel(None).0,
        supervisors: Vec::new(),
        last_error: None,
    };
    info!(pod = %w.key, node = %w.node, "admitted");
    let mut stage = Stage::Admit;
    let mut retry = Box::pin(tokio::time::sleep(Duration::ZERO));
    let mut resync = tokio::time::interval(Duration::from_secs(5));
    let (grace, delete_object) = loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(PodEvent::Updated(p)) => {
                    w.pod = *p;
                    if w.pod.metadata.deletion_timestamp.is_some() {
                        break (w.grace(), true);
                    }
                }
                Some(PodEvent::Deleted) => break (Duration::from_secs(2), false),
                Some(PodEvent::Shutdown) | None => break (w.grace().min(Duration::from_secs(10)), false),
            },
            _ = w.changed.notified() => { w.status_dirty = true; w.write_status().await; }
            _ = resync.tick() => if w.status_dirty { w.write_status().await },
            _ = &mut retry, if matches!(stage, Stage::Admit | Stage::Sandbox | Stage::Start) => {
                let step = match stage {
                    Stage::Admit => w.admit().map(|()| Stage::Sandbox),
                    Stage::Sandbox => w.make_sandbox().map(|()| Stage::Start),
                    Stage::Start => w.start().await.map(|()| Stage::Running),
                    _ => unreachable!(),
                };
                match step {
                    Ok(next) => {
                        stage = next;
                        w.last_error = None;
                        retry.as_mut().reset(tokio::time::Instant::now());
                    }
                    Err(StepError::Fatal(reason, msg)) => {
                        warn!(pod = %w.key, "{reason}: {msg}");
                        w.runtime.lock().unwrap().failed = Some((reason, msg));
                        stage = Stage::Failed;
                    }
                    Err(StepError::Retry(reason, msg)) => {
                        // Logged once per distinct error; retried every 2 s.
                        if w.last_error.as_ref() != Some(&msg) {
                            warn!(pod = %w.key, "{reason}: {msg} (retrying)");
                            w.last_error = Some(msg.clone());
                        }
                        let mut rt = w.runtime.lock().unwrap();
                        for c in &mut rt.containers {
                            c.phase = Phase::Waiting { reason: reason.clone(), message: Some(msg.clone()) };
                        }
                        retry.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(2));
                    }
                }
                w.changed.notify_one();
            }
        }
    };
    info!(pod = %w.key, grace_s = grace.as_secs_f64(), "stopping");
    w.teardown(grace).await;
    if delete_object {
        w.write_status().await;
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(w.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        // The processes are gone; the object must go too, even across an API server restart.
        let mut delay = Duration::from_millis(500);
        let mut logged = false;
        let since = tokio::time::Instant::now();
        // Bounded, so that an agent shutting down with the API server gone still stops; a pod
        // left Terminating is finished by the next agent (see `dispatch`).
        while since.elapsed() < Duration::from_secs(120) {
            match w.api.delete(&w.name, &dp).await {
                Ok(_) => {
                    info!(pod = %w.key, "deleted");
                    break;
                }
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => break,
                Err(e) => {
                    if !logged {
                        warn!(pod = %w.key, "final delete failed (retrying): {e}");
                        logged = true;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

enum StepError {
    /// The pod cannot run here (the kubelet's admission failures): it is Failed.
    Fatal(String, String),
    /// Not yet (a Secret that does not exist yet, a transient error): try again.
    Retry(String, String),
}

impl Worker {
    fn grace(&self) -> Duration {
        let s = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| self.pod.spec.as_ref()?.termination_grace_period_seconds)
            .unwrap_or(30);
        Duration::from_secs(s.max(0) as u64)
    }

    fn admit(&mut self) -> Result<(), StepError> {
        let want = pod_spec::gpus_requested(&self.pod);
        if self
            .pod
            .spec
            .as_ref()
            .is_some_and(|s| s.init_containers.as_ref().is_some_and(|i| !i.is_empty()))
        {
            return Err(StepError::Fatal(
                "UnexpectedAdmissionError".into(),
                "init containers are not supported by the local node agent".into(),
            ));
        }
        self.gpus = self
            .ctx
            .gpus
            .lock()
            .unwrap()
            .allocate(&self.node, &self.uid, want)
            .map_err(|e| StepError::Fatal("UnexpectedAdmissionError".into(), e.to_string()))?;
        Ok(())
    }

    fn make_sandbox(&mut self) -> Result<(), StepError> {
        let sb = self
            .ctx
            .network
            .create_sandbox(&self.uid)
            .map_err(|e| StepError::Retry("CreatePodSandboxError".into(), format!("{e:#}")))?;
        info!(pod = %self.key, ip = %sb.ip, netns = %sb.netns, "sandbox ready");
        self.runtime.lock().unwrap().pod_ip = Some(sb.ip.to_string());
        self.sandbox = Some(sb);
        Ok(())
    }

    async fn lookups(&self) -> Result<Lookups, kube::Error> {
        let (cm_names, secret_names) = pod_spec::referenced(&self.pod);
        let ns = self.pod.metadata.namespace.as_deref().unwrap_or("default");
        let cms: Api<ConfigMap> = Api::namespaced(self.ctx.client.clone(), ns);
        let secrets: Api<Secret> = Api::namespaced(self.ctx.client.clone(), ns);
        let mut l = Lookups::default();
        for n in cm_names {
            if let Some(cm) = cms.get_opt(&n).await? {
                let mut m: BTreeMap<String, Vec<u8>> = cm
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                m.extend(
                    cm.binary_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0)),
                );
                l.config_maps.insert(n, m);
            }
        }
        for n in secret_names {
            if let Some(s) = secrets.get_opt(&n).await? {
                let mut m: BTreeMap<String, Vec<u8>> = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                m.extend(
                    s.string_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes())),
                );
                l.secrets.insert(n, m);
            }
        }
        Ok(l)
    }

    async fn start(&mut self) -> Result<(), StepError> {
        let lookups = self.lookups().await.map_err(config_error)?;
        let sb = self.sandbox.clone().expect("sandbox before start");
        let facts = PodFacts {
            pod_ip: sb.ip.to_string(),
            host_ip: self.ctx.host_ip.clone(),
            node_name: self.node.clone(),
            gpus: self.gpus.clone(),
            api_host: self.ctx.api_host.clone(),
            api_port: self.ctx.api_port,
        };
        let spec = self.pod.spec.clone().unwrap_or_default();
        let volumes =
            pod_spec::volume_contents(&self.pod, &facts, &lookups).map_err(config_error)?;
        // Resolve every container before starting any: a pod starts whole or not at all.
        let mut launches = Vec::new();
        let volume_dirs: BTreeMap<String, PathBuf> = volumes
            .keys()
            .map(|v| (v.clone(), self.dir.join("volumes").join(v)))
            .collect();
        for c in &spec.containers {
            let image = self
                .ctx
                .config
                .image(c.image.as_deref().unwrap_or(""))
                .map_err(|e| StepError::Retry("ErrImagePull".into(), e.to_string()))?;
            image
                .pull()
                .map_err(|e| StepError::Retry("ErrImagePull".into(), format!("{e:#}")))?;
            let env = pod_spec::container_env(&self.pod, c, &image.env, &facts, &lookups)
                .map_err(config_error)?;
            let env_map: BTreeMap<String, String> = env.iter().cloned().collect();
            let expand = |v: &Vec<String>| -> Vec<String> {
                v.iter().map(|a| pod_spec::expand(a, &env_map)).collect()
            };
            let command = c.command.as_ref().map(expand).unwrap_or_default();
            let args = c.args.as_ref().map(expand);
            let (program, argv) = image
                .resolve(&command, args.as_deref())
                .map_err(|e| StepError::Retry("ErrImagePull".into(), e.to_string()))?;
            let binds = pod_spec::container_binds(c, &volume_dirs).map_err(config_error)?;
            let sc = c.security_context.clone().unwrap_or_default();
            let psc = spec.security_context.clone().unwrap_or_default();
            let uid = sc.run_as_user.or(psc.run_as_user).map(|u| u as u32);
            let gid = sc.run_as_group.or(psc.run_as_group).map(|g| g as u32);
            if sc.run_as_non_root.or(psc.run_as_non_root) == Some(true) && uid.unwrap_or(0) == 0 {
                return Err(config_error(
                    "container has runAsNonRoot and would run as root (set runAsUser)",
                ));
            }
            launches.push((
                c.clone(),
                Launch {
                    helper: ExecInPod {
                        netns: sb.netns_path(),
                        hostname: self.name.chars().take(63).collect(),
                        binds,
                        read_only_root: sc.read_only_root_filesystem == Some(true),
                        uid,
                        gid,
                        workdir: c.working_dir.clone().unwrap_or_else(|| "/".into()).into(),
                        program,
                        args: argv.into_iter().map(Into::into).collect(),
                    },
                    env,
                    log: self.dir.join(format!("{}.log", c.name)),
                },
            ));
        }
        self.materialize(&volumes, &volume_dirs, uid_of(&spec))
            .map_err(|e| config_error(format!("{e:#}")))?;
        for (_, l) in &launches {
            self.ctx
                .ensure_mount_points(&l.helper.binds)
                .map_err(|e| config_error(format!("{e:#}")))?;
        }
        let restart_policy = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into());
        for (index, (c, launch)) in launches.into_iter().enumerate() {
            let h = container::Handle {
                index,
                pod: self.key.clone(),
                pod_ip: sb.ip.to_string(),
                runtime: self.runtime.clone(),
                changed: self.changed.clone(),
                http: self.ctx.http.clone(),
                agent_exe: self.ctx.agent_exe.clone(),
            };
            let stop = self.stop.subscribe();
            self.supervisors.push(tokio::spawn(container::supervise(
                h,
                c,
                launch,
                restart_policy.clone(),
                stop,
            )));
        }
        Ok(())
    }

    /// Writes the volumes' files under the pod's directory (fresh each start).
    fn materialize(
        &self,
        volumes: &BTreeMap<String, VolumeContent>,
        dirs: &BTreeMap<String, PathBuf>,
        owner: Option<u32>,
    ) -> Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        for (name, content) in volumes {
            let dir = &dirs[name];
            let _ = std::fs::remove_dir_all(dir);
            std::fs::create_dir_all(dir)?;
            match content {
                VolumeContent::EmptyDir => {
                    // Writable by whatever user the containers run as.
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777))?;
                }
                VolumeContent::Files(files) => {
                    for (rel, (bytes, mode)) in files {
                        let path = dir.join(rel);
                        if let Some(parent) = path.parent() {
                            std::fs::create_dir_all(parent)?;
                        }
                        std::fs::write(&path, bytes)
                            .with_context(|| format!("writing {}", path.display()))?;
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))?;
                        if let Some(u) = owner {
                            // A non-root container must be able to read its 0400/0600 secrets.
                            nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(u)), None)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn write_status(&mut self) {
        let status = {
            let rt = self.runtime.lock().unwrap();
            status::pod_status(&rt, &self.conditions, Timestamp::now())
        };
        let patch = serde_json::json!({ "status": status });
        match self
            .api
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.conditions = status.conditions.unwrap_or_default();
                self.status_dirty = false;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => self.status_dirty = false,
            Err(e) => {
                if !self.status_dirty {
                    warn!(pod = %self.key, "status write failed (will retry): {e}");
                }
                self.status_dirty = true;
            }
        }
    }

    async fn teardown(&mut self, grace: Duration) {
        let _ = self.stop.send(Some(grace));
        for s in self.supervisors.drain(..) {
            let _ = s.await;
        }
        if let Some(sb) = self.sandbox.take() {
            if let Err(e) = self.ctx.network.delete_sandbox(&sb) {
                warn!(pod = %self.key, "removing sandbox: {e:#}");
            }
            self.runtime.lock().unwrap().pod_ip = None;
        }
        self.ctx.gpus.lock().unwrap().release(&self.uid);
        let _ = std::fs::remove_dir_all(self.dir.join("volumes"));
    }
}

/// The kubelet's reason for a pod whose config cannot be resolved yet.
fn config_error(e: impl ToString) -> StepError {
    StepError::Retry("CreateContainerConfigError".into(), e.to_string())
}

fn uid_of(spec: &k8s_openapi::api::core::v1::PodSpec) -> Option<u32> {
    let from_containers: BTreeSet<i64> = spec
        .containers
        .iter()
        .filter_map(|c| c.security_context.as_ref()?.run_as_user)
        .collect();
    let pod = spec.security_context.as_ref().and_then(|s| s.run_as_user);
    // Files are owned by the pod's user (or the only container user), as fsGroup would allow.
    match (pod, from_containers.len()) {
        (Some(u), _) => Some(u as u32),
        (None, 1) => from_containers.first().map(|u| *u as u32),
        _ => None,
    }
}

impl Ctx {
    /// Mount points must exist on the host; the ones we create are recorded for `down`.
    fn ensure_mount_points(&self, binds: &[super::exec::Bind]) -> Result<()> {
        for b in binds {
            if b.dst.exists() {
                continue;
            }
            let mut created = Vec::new();
            let mut p: &Path = &b.dst;
            while !p.exists() {
                created.push(p.to_path_buf());
                p = p
                    .parent()
                    .context("mount point without an existing ancestor")?;
            }
            if b.src.is_file() {
                std::fs::create_dir_all(b.dst.parent().unwrap())?;
                std::fs::write(&b.dst, b"")?;
            } else {
                std::fs::create_dir_all(&b.dst)?;
            }
            let mut record = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.created_dirs_file)?;
            for c in created {
                use std::io::Write;
                writeln!(record, "{}", c.display())?;
            }
        }
        Ok(())
    }
}
