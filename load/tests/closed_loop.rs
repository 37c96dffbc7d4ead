//! The closed loop on a real cluster: the operator from the Helm chart, the default model's
//! engines and their sidecars as pods, and a burst of the Azure code trace replayed against the
//! ready pods (`workload::CODE_BURST`, the README's main job). The operator must scale 1 -> N
//! while the burst builds, before the KV pools run out; the sidecars' guards must cut their
//! engines' limits, within a second of every KV redline crossing; after the burst the service must come
//! back to one replica through drains, with no request failing; the decisions must show as
//! Events and in status.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use kube::Api;
use redline_load::report::{self, LIVE_HEADER};
use redline_load::run::{self, Config};
use redline_load::transport::Transport;
use redline_load::workload::{self, CODE_BURST, CODE_TRACE};
use redline_operator::children;
use redline_operator::crd::InferenceService;
use redline_testcluster::testing::{self, client, repo, wait_for, TestNs};

const RELEASE_NS: &str = "redline-loop";
/// The guard's KV redline in this test: low enough that the burst surely reaches it on some pod
/// (one 384-token prompt holds a quarter of the 32 MiB pool of f16 KV), so its reaction is measured.
const GUARD_REDLINE: f64 = 0.4;
/// Preemptions (a sequence evicted because the KV pool ran out) allowed over the whole burst.
const MAX_PREEMPTIONS: u64 = 2;
/// The guard's reaction to a crossing, as seen from outside: its own 250 ms tick plus the
/// observer's 250 ms sampling fit well inside.
const GUARD_WITHIN: f64 = 1.0;

#[tokio::test]
async fn a_trace_burst_scales_up_before_kv_runs_out_and_back_down_through_drains() {
    let client = client().await;
    testing::install_operator(&client, RELEASE_NS).await;
    let ns = TestNs::new(&client, "rl-loop").await;
    let _logs = testing::LogsOnPanic::operator_and(RELEASE_NS, &ns.name);

    // The README's example, as users apply it, with a shorter scale-down window so the test
    // sees the way down within minutes.
    let text = std::fs::read_to_string(repo().join("examples/smollm2.yaml")).unwrap();
    let mut isvc: InferenceService = serde_yaml::from_str(&text).unwrap();
    let policy = isvc
        .spec
        .autoscaling
        .as_mut()
        .and_then(|a| a.policy.as_mut())
        .expect("the example has an inline policy");
    policy.guard_kv_usage = GUARD_REDLINE;
    policy.scale_down_window_seconds = 20;
    let name = isvc.metadata.name.clone().unwrap();
    let isvcs: Api<InferenceService> = Api::namespaced(client.clone(), &ns.name);
    isvcs.create(&PostParams::default(), &isvc).await.unwrap();
    wait_for("one ready replica", Duration::from_secs(120), || async {
        let i = isvcs.get(&name).await.map_err(|e| e.to_string())?;
        let st = i.status.clone().unwrap_or_default();
        // The sidecar has the operator's limits (and so the guard's redline) once the loop
        // has listed the pod in status.
        if st.ready_replicas == 1 && st.pod_limits.len() == 1 {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;

    let (replay, slice) = CODE_BURST;
    let trace = redline_sim::trace::read(&repo().join(CODE_TRACE), replay).unwrap();
    let jobs = workload::slice(&trace, &slice);
    assert!(jobs.len() >= 20, "{} requests in the burst", jobs.len());
    let transport = transport_for(&client);
    let cfg = Config {
        namespace: ns.name.clone(),
        service: name.clone(),
        tick: Duration::from_millis(250),
        settle_to: Some(1),
        settle_timeout: Duration::from_secs(180),
    };
    eprintln!("{LIVE_HEADER}");
    let mut shown = -10.0;
    let result = run::run(client.clone(), transport, &cfg, jobs, |s| {
        if s.t - shown >= 5.0 {
            eprintln!("{}", report::live_row(s));
            shown = s.t;
        }
    })
    .await
    .unwrap();
    for e in &result.events {
        eprintln!(
            "  {:>5.0}s  {:<12} x{:<3} {}",
            e.t, e.reason, e.count, e.note
        );
    }
    let s = report::summarize(&result, 2.0, GUARD_REDLINE);
    eprintln!("{}", report::table(&s, 2.0));
    let png = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("closed-loop.png");
    redline_load::plot::write(
        &png,
        "closed loop: code-trace burst",
        &result,
        GUARD_REDLINE,
    )
    .unwrap();
    eprintln!("plot: {}", png.display());

    // Every request answered in full, drains included.
    let failures: Vec<&String> = result
        .requests
        .iter()
        .filter_map(|r| r.result.as_ref().err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} failed: {failures:?}",
        failures.len(),
        s.requests
    );
    // Scaled out while the burst built, and the new pods served.
    assert!(s.peak_desired >= 2 && s.peak_ready >= 2, "{s:?}");
    assert!(s.scale_ups >= 1, "no ScaledUp event: {:?}", result.events);
    let pods_used: std::collections::BTreeSet<&str> = result
        .requests
        .iter()
        .filter_map(|r| r.result.as_ref().ok().map(|a| a.pod.as_str()))
        .collect();
    assert!(pods_used.len() >= 2, "answered by {pods_used:?} only");
    // ...before the KV pools ran out.
    assert!(
        s.preemptions <= MAX_PREEMPTIONS,
        "{} preemptions: {s:?}",
        s.preemptions
    );
    assert!(s.kv_peak < 1.0, "a KV pool filled: {s:?}");
    // The fast loop: the guards cut limits, within a second of every redline crossing. (The
    // guard acts on its forecast, so on some runs it keeps every pod under the redline and
    // there is no crossing to time.)
    assert!(s.guard_actions >= 1, "the guards never acted: {s:?}");
    // Every cut, timed by its sidecar from the scrape that showed the pressure to the engine's
    // acknowledgement over its admin API, within a second.
    assert!(s.guard_cuts_timed >= 1, "no guard cut timed: {s:?}");
    assert_eq!(s.guard_cuts_over_1s, 0, "guard cuts slower than 1 s: {s:?}");
    assert!(
        s.unanswered_crossings == 0 && s.slowest_guard_reaction.is_none_or(|t| t <= GUARD_WITHIN),
        "a guard reacted late or not at all: {:?}",
        report::guard_reactions(&result.pods, GUARD_REDLINE)
    );
    // The engines' count of requests served after the objective reaches the service's status:
    // when the replay measured first tokens well past it, the operator showed a late rate.
    let objective = isvc
        .spec
        .ttft_objective_ms()
        .expect("the example has an objective") as f64;
    let late: Vec<f64> = result
        .samples
        .iter()
        .filter_map(|x| x.late_per_second)
        .collect();
    assert!(!late.is_empty(), "no status.lateRequests in any sample");
    let late_seen = late.iter().copied().fold(0.0, f64::max);
    let well_past = result
        .requests
        .iter()
        .filter_map(|r| r.result.as_ref().ok()?.ttft)
        .filter(|&t| t > 2.0 * objective / 1000.0)
        .count();
    if well_past > 0 {
        assert!(
            late_seen > 0.0,
            "{well_past} first tokens after twice the objective, no late rate in status"
        );
    }
    // Back to one replica, through drains, with the decision in status.
    assert!(
        result.settled,
        "not back to one replica: {:?}",
        result.samples.last()
    );
    assert!(s.drains >= 1 && s.scale_downs >= 1, "{:?}", result.events);
    let isvc = isvcs.get(&name).await.unwrap();
    let st = isvc.status.clone().unwrap();
    let last = st.last_decision.expect("a last decision in status");
    assert!(last.summary.ends_with("->1"), "{last:?}");
    assert!(last.reason.contains("drained"), "{last:?}");
    assert_eq!(isvc.spec.replicas, Some(1));

    a_drain_under_steady_load_refuses_nobody(&client, &ns.name, &isvc, transport_for(&client))
        .await;

    if testing::is_local_cluster() {
        a_drain_left_by_an_operator_and_a_sidecar_that_went_away_is_cancelled(
            &client, &ns.name, &isvc,
        )
        .await;
    } else {
        eprintln!("skipped the operator restart mid-drain: the host cannot reach pod IPs here");
    }
    testing::run_helm(&["uninstall", "redline", "--namespace", RELEASE_NS, "--wait"]);
}

/// The host routes to pod IPs on the local cluster; elsewhere (kind) the pod proxy.
fn transport_for(client: &kube::Client) -> Transport {
    if testing::is_local_cluster() {
        Transport::pod_ip()
    } else {
        Transport::Proxy(client.clone())
    }
}

/// A scale-down while requests keep coming: the drained pod turns not ready at once, but the
/// load generator, like a Service's endpoints, learns of it only from the API, a readiness
/// probe later. Requests it sends there meanwhile must be admitted (the engine's lame duck),
/// so that not one is refused: through a Service, a client that never retries would have lost
/// none. A service of its own at two replicas, whose floor drops to one as a steady stream of
/// small requests begins.
async fn a_drain_under_steady_load_refuses_nobody(
    client: &kube::Client,
    ns: &str,
    template: &InferenceService,
    transport: Transport,
) {
    use kube::api::{Patch, PatchParams};
    const STREAM_SECONDS: f64 = 90.0;
    let mut isvc = template.clone();
    let name = "steady".to_string();
    isvc.metadata = kube::api::ObjectMeta {
        name: Some(name.clone()),
        ..Default::default()
    };
    (isvc.spec.min_replicas, isvc.spec.replicas, isvc.status) = (2, Some(2), None);
    // Short prompts cost a pod far less than the trace's: sized by the example's figures for
    // them, this stream would keep two replicas. And sized by tokens, not by the engines'
    // stepping time, which on a busy 2-core machine put off the drain by minutes (a CI run).
    if let Some(p) = isvc
        .spec
        .autoscaling
        .as_mut()
        .and_then(|a| a.policy.as_mut())
    {
        p.replica_capacity.prompt_tokens_per_second = 600.0;
        p.replica_capacity.generation_tokens_per_second = 200.0;
        p.replica_capacity.step_seconds = None;
    }
    let isvcs: Api<InferenceService> = Api::namespaced(client.clone(), ns);
    isvcs.create(&PostParams::default(), &isvc).await.unwrap();
    wait_for("two ready replicas", Duration::from_secs(180), || async {
        let st = isvcs
            .get(&name)
            .await
            .map_err(|e| e.to_string())?
            .status
            .unwrap_or_default();
        (st.ready_replicas == 2 && st.pod_limits.len() == 2)
            .then_some(())
            .ok_or(format!("{st:?}"))
    })
    .await;
    let lame_duck = isvc.spec.lame_duck_seconds;
    assert!(lame_duck >= 3, "the example's lame duck: {lame_duck} s");

    // Four small requests a second: one replica carries them easily.
    let jobs: Vec<redline_sim::trace::Request> = (0..(STREAM_SECONDS * 4.0) as usize)
        .map(|i| redline_sim::trace::Request {
            arrival: i as f64 / 4.0,
            prompt_tokens: 16,
            output_tokens: 2,
        })
        .collect();
    let floor = {
        let (isvcs, name) = (isvcs.clone(), name.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            isvcs
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"spec": {"minReplicas": 1}})),
                )
                .await
                .unwrap();
        })
    };
    let cfg = Config {
        namespace: ns.to_string(),
        service: name.clone(),
        tick: Duration::from_millis(250),
        settle_to: Some(1),
        settle_timeout: Duration::from_secs(60),
    };
    let result = run::run(client.clone(), transport, &cfg, jobs, |_| {})
        .await
        .unwrap();
    floor.await.unwrap();
    for e in &result.events {
        eprintln!("  {:>5.0}s  {:<12} {}", e.t, e.reason, e.note);
    }
    let drain = result
        .events
        .iter()
        .find(|e| e.reason == "Draining")
        .unwrap_or_else(|| panic!("no drain: {:?}", result.events));
    let drained_at = drain.t;
    let drained_pod = drain
        .note
        .strip_prefix("drain ")
        .and_then(|n| n.split(':').next())
        .unwrap_or_default();
    assert!(
        result.events.iter().any(|e| e.reason == "ScaledDown") && result.settled,
        "the drained pod was not removed: {:?}",
        result.events
    );
    // The drain began with requests still to come for longer than the readiness lag.
    assert!(
        drained_at + 2.0 * lame_duck as f64 <= STREAM_SECONDS,
        "the drain came at {drained_at:.0} s, too late in a {STREAM_SECONDS} s stream"
    );
    let s = report::summarize(&result, 2.0, GUARD_REDLINE);
    let failures: Vec<&String> = result
        .requests
        .iter()
        .filter_map(|r| r.result.as_ref().err())
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        s.rerouted, 0,
        "a draining pod refused requests the load generator sent before it saw the drain"
    );
    // What the lame duck took in: requests that reached the drained pod after its drain began
    // (how many depends on where in its 2 s period the readiness probe fell).
    let admitted_drained = result
        .requests
        .iter()
        .filter(|r| {
            r.arrival >= drained_at
                && r.result
                    .as_ref()
                    .is_ok_and(|a| drained_pod.split(',').any(|p| p == a.pod))
        })
        .count();
    eprintln!(
        "steady stream: {} requests, 0 failed, 0 refused; drain of {drained_pod} at {drained_at:.1} s, \
         {admitted_drained} admitted by it after the drain began",
        result.requests.len()
    );
    isvcs.delete(&name, &Default::default()).await.unwrap();
}

/// The operator goes away while its sidecar holds a pod drained (a leader replaced mid-drain:
/// a `helm upgrade`, a node drain), then the sidecar crashes too, and a new operator starts
/// with no memory of that drain. The engine turned not ready on purpose and would stay so for
/// good, serving nothing: the restarted sidecar must report the drain it finds, and the new
/// operator must serve the pod again and say so.
async fn a_drain_left_by_an_operator_and_a_sidecar_that_went_away_is_cancelled(
    client: &kube::Client,
    ns: &str,
    isvc: &InferenceService,
) {
    let name = isvc.metadata.name.clone().unwrap();
    let scale_operator = |n: &str| {
        testing::run_kubectl(&[
            "scale",
            "deployment/redline-operator",
            &format!("--replicas={n}"),
            "--namespace",
            RELEASE_NS,
        ])
    };
    let op_pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NS);
    scale_operator("0");
    wait_for("the operator gone", Duration::from_secs(60), || async {
        let l = op_pods
            .list(&ListParams::default().labels("app.kubernetes.io/name=redline-operator"))
            .await
            .map_err(|e| e.to_string())?;
        if l.items.is_empty() {
            Ok(())
        } else {
            Err(format!("{} operator pods", l.items.len()))
        }
    })
    .await;

    // What the operator's last PUT left: the same limits and guard, drain on.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = format!("{}={name}", children::SERVICE_LABEL);
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap();
    let live: Vec<&Pod> = list
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    assert_eq!(live.len(), 1, "one engine pod");
    let pod = live[0].metadata.name.clone().unwrap();
    let sidecar = testing::Sidecar::at(
        client,
        live[0],
        &children::token_secret_name(isvc),
        children::SIDECAR_PORT as u16,
    )
    .await;
    sidecar.set_drain(true).await;
    wait_for(
        "the drained pod not ready",
        Duration::from_secs(30),
        || async {
            let p = pods.get(&pod).await.map_err(|e| e.to_string())?;
            if testing::is_ready(&p) {
                Err("still ready".to_string())
            } else {
                Ok(())
            }
        },
    )
    .await;
    testing::crash_in_pod(&pod, "redline-sidecar");
    wait_for(
        "the restarted sidecar reporting the drain it found",
        Duration::from_secs(60),
        || async {
            let p = pods.get(&pod).await.map_err(|e| e.to_string())?;
            let restarts = p
                .status
                .and_then(|s| s.container_statuses)
                .unwrap_or_default()
                .iter()
                .find(|c| c.name == "sidecar")
                .map_or(0, |c| c.restart_count);
            let r = sidecar.pressure().await?;
            let engine_draining = r["engine"]["draining"].as_bool() == Some(true);
            let held = r["limits"]["drain"].as_bool() == Some(true);
            if restarts >= 1 && engine_draining && held {
                Ok(())
            } else {
                Err(format!(
                    "sidecar restarts {restarts}, engine draining {engine_draining}, held {held}"
                ))
            }
        },
    )
    .await;

    let since = run::unix_ms();
    scale_operator("1");
    wait_for(
        "the new operator serving the pod again",
        Duration::from_secs(120),
        || async {
            let drain = sidecar.draining().await?;
            let p = pods.get(&pod).await.map_err(|e| e.to_string())?;
            if !drain && testing::is_ready(&p) {
                Ok(())
            } else {
                Err(format!("drain {drain}, ready {}", testing::is_ready(&p)))
            }
        },
    )
    .await;
    let events = run::events(client, ns, &name, since).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.reason == "DrainCancelled" && e.note.contains(&pod)),
        "no DrainCancelled Event for {pod}: {events:?}"
    );
    let isvcs: Api<InferenceService> = Api::namespaced(client.clone(), ns);
    assert_eq!(isvcs.get(&name).await.unwrap().spec.replicas, Some(1));
}
