//! Proof that the local cluster is a cluster: the real scheduler places GPU pods and leaves the
//! excess Pending, the agent runs pods as processes with Kubernetes' semantics (SIGTERM on
//! delete, restarts, readiness from the process's own endpoint), pods reach each other by IP,
//! and a process authenticates with its ServiceAccount token under RBAC.
//!
//! Runs against `$KUBECONFIG` when set (e.g. a kind cluster with the images loaded), otherwise
//! brings the local cluster up with `redline-cluster up` (idempotent; `down` stops it).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use redline_testcluster::testing::{self, client, is_ready, TestNs};
use serde_json::json;

fn testpod_image() -> String {
    std::env::var("REDLINE_TESTPOD_IMAGE").unwrap_or_else(|_| "ghcr.io/redline/testpod:dev".into())
}

/// The ServiceAccount admission of a 1.20 server refuses pods until the account's token
/// exists; retry those refusals as a ReplicaSet would.
async fn create_pod(pods: &Api<Pod>, spec: serde_json::Value) -> Pod {
    let pod: Pod = serde_json::from_value(spec).unwrap();
    let start = Instant::now();
    loop {
        match pods.create(&PostParams::default(), &pod).await {
            Ok(p) => return p,
            Err(e)
                if start.elapsed() < Duration::from_secs(30) && e.to_string().contains("token") =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(e) => panic!("creating pod: {e}"),
        }
    }
}

fn testpod(name: &str, extra_env: serde_json::Value) -> serde_json::Value {
    let mut env = vec![
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
    ];
    if let Some(a) = extra_env.as_array() {
        env.extend(a.iter().cloned());
    }
    json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "terminationGracePeriodSeconds": 10,
            "containers": [{
                "name": "main",
                "image": testpod_image(),
                "env": env,
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1, "failureThreshold": 1},
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 2},
                "securityContext": {"runAsUser": 65534, "runAsNonRoot": true, "readOnlyRootFilesystem": true},
            }]
        }
    })
}

fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |c| c.iter().map(|c| c.restart_count).sum())
}

/// Polls the pod until `f` holds; panics with the pod's last status after `timeout`.
async fn wait_pod(
    pods: &Api<Pod>,
    name: &str,
    what: &str,
    timeout: Duration,
    f: impl Fn(&Pod) -> bool,
) -> Pod {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < timeout {
        if let Ok(Some(p)) = pods.get_opt(name).await {
            if f(&p) {
                return p;
            }
            last = Some(p);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "pod {name}: not {what} after {timeout:?}; status: {}",
        serde_json::to_string_pretty(&last.and_then(|p| p.status)).unwrap()
    );
}

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Calls the testpod's port 8080 through the API server's pod proxy.
async fn pod_http(
    client: &Client,
    ns: &str,
    pod: &str,
    method: &str,
    path_and_query: &str,
) -> Result<String, String> {
    testing::pod_http(client, ns, pod, 8080, method, path_and_query, None).await
}

#[tokio::test]
async fn gpu_pods_beyond_capacity_stay_pending() {
    let client = client().await;
    let ns = TestNs::new(&client, "rl-gpu").await;
    // The node with the most GPUs; ask for one pod more than it holds.
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    let (node, gpus) = nodes
        .items
        .iter()
        .filter_map(|n| {
            let g = n
                .status
                .as_ref()?
                .allocatable
                .as_ref()?
                .get("nvidia.com/gpu")?
                .0
                .parse::<i32>()
                .ok()?;
            Some((n.metadata.name.clone()?, g))
        })
        .max_by_key(|(_, g)| *g)
        .expect("a node with nvidia.com/gpu");
    assert!(gpus >= 1, "no node has GPUs");
    let mut template = testpod("gpu", json!([]));
    template["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": node});
    template["spec"]["containers"][0]["resources"] = json!({"limits": {"nvidia.com/gpu": "1"}});
    let deploy: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "gpu"},
        "spec": {
            "replicas": gpus + 1,
            "selector": {"matchLabels": {"app": "gpu"}},
            "template": {"metadata": {"labels": {"app": "gpu"}}, "spec": template["spec"]},
        }
    }))
    .unwrap();
    Api::<Deployment>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &deploy)
        .await
        .unwrap();
    let pods = ns.pods(&client);
    let start = Instant::now();
    let (ready, pending) = loop {
        let list = pods.list(&ListParams::default()).await.unwrap().items;
        let ready: Vec<Pod> = list.iter().filter(|p| is_ready(p)).cloned().collect();
        let pending: Vec<Pod> = list
            .iter()
            .filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| {
                        c.iter().any(|c| {
                            c.type_ == "PodScheduled"
                                && c.status == "False"
                                && c.reason.as_deref() == Some("Unschedulable")
                                && c.message
                                    .as_deref()
                                    .is_some_and(|m| m.contains("nvidia.com/gpu"))
                        })
                    })
            })
            .cloned()
            .collect();
        if ready.len() == gpus as usize && pending.len() == 1 && list.len() == gpus as usize + 1 {
            break (ready, pending);
        }
        assert!(
            start.elapsed() < READY_TIMEOUT,
            "want {gpus} Ready + 1 Unschedulable; have {} pods, {} ready, {} unschedulable",
            list.len(),
            ready.len(),
            pending.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        pending[0].status.as_ref().unwrap().phase.as_deref(),
        Some("Pending")
    );
    assert!(pending[0].spec.as_ref().unwrap().node_name.is_none());
    // Each running pod holds its own device.
    let mut devices = BTreeSet::new();
    for p in &ready {
        let name = p.metadata.name.as_deref().unwrap();
        let d = pod_http(
            &client,
            &ns.name,
            name,
            "GET",
            "/env/NVIDIA_VISIBLE_DEVICES",
        )
        .await
        .unwrap();
        assert!(devices.insert(d.clone()), "device {d} assigned twice");
    }
    assert_eq!(devices.len(), gpus as usize);
}

#[tokio::test]
async fn deleted_pod_sees_sigterm_before_it_ends() {
    let client = client().await;
    let ns = TestNs::new(&client, "rl-term").await;
    let pods = ns.pods(&client);
    create_pod(&pods, testpod("recorder", json!([]))).await;
    let rec = wait_pod(&pods, "recorder", "Ready", READY_TIMEOUT, is_ready).await;
    let rec_ip = rec.status.unwrap().pod_ip.unwrap();
    let url = format!("http://{rec_ip}:8080/records");
    create_pod(
        &pods,
        testpod("victim", json!([{"name": "TERM_REPORT_URL", "value": url}])),
    )
    .await;
    let victim = wait_pod(&pods, "victim", "Ready", READY_TIMEOUT, is_ready).await;
    let uid = victim.metadata.uid.unwrap();
    pods.delete("victim", &DeleteParams::default())
        .await
        .unwrap();
    let start = Instant::now();
    while pods
        .get_opt("victim")
        .await
        .unwrap()
        .is_some_and(|p| p.metadata.uid.as_deref() == Some(&uid))
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "victim not gone 30 s after delete"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let records = pod_http(&client, &ns.name, "recorder", "GET", "/records")
        .await
        .unwrap();
    let records: Vec<String> = serde_json::from_str(&records).unwrap();
    assert_eq!(
        records,
        vec!["victim SIGTERM".to_string()],
        "the victim's own report of its SIGTERM"
    );
}

#[tokio::test]
async fn killed_container_restarts_and_becomes_ready_again() {
    let client = client().await;
    let ns = TestNs::new(&client, "rl-kill").await;
    let pods = ns.pods(&client);
    create_pod(&pods, testpod("crashy", json!([]))).await;
    let before = wait_pod(&pods, "crashy", "Ready", READY_TIMEOUT, is_ready).await;
    assert_eq!(restarts(&before), 0);
    // The process SIGKILLs itself; the proxied request fails with it.
    let _ = pod_http(&client, &ns.name, "crashy", "POST", "/kill").await;
    let after = wait_pod(&pods, "crashy", "restarted and Ready", READY_TIMEOUT, |p| {
        restarts(p) >= 1 && is_ready(p)
    })
    .await;
    let cs = &after.status.unwrap().container_statuses.unwrap()[0];
    let last = cs
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .expect("lastState.terminated");
    assert_eq!(last.exit_code, 137, "killed by SIGKILL: {last:?}");
    assert_eq!(cs.restart_count, 1);
}

#[tokio::test]
async fn readiness_follows_the_process_endpoint() {
    let client = client().await;
    let ns = TestNs::new(&client, "rl-ready").await;
    let pods = ns.pods(&client);
    create_pod(&pods, testpod("flip", json!([]))).await;
    wait_pod(&pods, "flip", "Ready", READY_TIMEOUT, is_ready).await;
    pod_http(&client, &ns.name, "flip", "POST", "/ready?value=false")
        .await
        .unwrap();
    let p = wait_pod(&pods, "flip", "NotReady", Duration::from_secs(20), |p| {
        !is_ready(p)
    })
    .await;
    assert_eq!(restarts(&p), 0, "readiness must not restart the container");
    assert_eq!(p.status.unwrap().phase.as_deref(), Some("Running"));
    pod_http(&client, &ns.name, "flip", "POST", "/ready?value=true")
        .await
        .unwrap();
    wait_pod(
        &pods,
        "flip",
        "Ready again",
        Duration::from_secs(20),
        is_ready,
    )
    .await;
}

#[tokio::test]
async fn pods_reach_each_other_by_ip() {
    let client = client().await;
    let ns = TestNs::new(&client, "rl-net").await;
    let pods = ns.pods(&client);
    create_pod(&pods, testpod("alpha", json!([]))).await;
    create_pod(&pods, testpod("beta", json!([]))).await;
    let a = wait_pod(&pods, "alpha", "Ready", READY_TIMEOUT, is_ready).await;
    let b = wait_pod(&pods, "beta", "Ready", READY_TIMEOUT, is_ready).await;
    let (a_ip, b_ip) = (
        a.status.unwrap().pod_ip.unwrap(),
        b.status.unwrap().pod_ip.unwrap(),
    );
    assert_ne!(a_ip, b_ip, "each pod has its own IP (both listen on :8080)");
    let got = pod_http(
        &client,
        &ns.name,
        "alpha",
        "GET",
        &format!("/fetch?url=http://{b_ip}:8080/whoami"),
    )
    .await
    .unwrap();
    assert_eq!(got, "beta");
    let got = pod_http(
        &client,
        &ns.name,
        "beta",
        "GET",
        &format!("/fetch?url=http://{a_ip}:8080/whoami"),
    )
    .await
    .unwrap();
    assert_eq!(got, "alpha");
}

#[tokio::test]
async fn service_account_token_authenticates_and_rbac_refuses_the_rest() {
    let client = client().await;
    let ns = TestNs::new(&client, "rl-rbac").await;
    let n = ns.name.clone();
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "reader"}})).unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), &n)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]
    }))
    .unwrap();
    Api::<Role>::namespaced(client.clone(), &n)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let rb: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "reader-reads-pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": n}]
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), &n)
        .create(&PostParams::default(), &rb)
        .await
        .unwrap();
    let pods = ns.pods(&client);
    let mut spec = testpod("reader", json!([]));
    spec["spec"]["serviceAccountName"] = json!("reader");
    create_pod(&pods, spec).await;
    wait_pod(&pods, "reader", "Ready", READY_TIMEOUT, is_ready).await;
    let kube = |path: String| {
        let (client, n) = (client.clone(), n.clone());
        async move {
            let r = pod_http(&client, &n, "reader", "GET", &format!("/kube?path={path}"))
                .await
                .unwrap();
            serde_json::from_str::<serde_json::Value>(&r).unwrap()
        }
    };
    let allowed = kube(format!("/api/v1/namespaces/{n}/pods")).await;
    assert_eq!(allowed["status"], 200, "{allowed}");
    let names: Vec<&str> = allowed["body"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, vec!["reader"]);
    for denied in [
        format!("/api/v1/namespaces/{n}/secrets"),
        "/api/v1/namespaces/kube-system/pods".to_string(),
        "/api/v1/nodes".to_string(),
    ] {
        let r = kube(denied.clone()).await;
        assert_eq!(r["status"], 403, "{denied}: {r}");
        let msg = r["body"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(&format!("system:serviceaccount:{n}:reader")),
            "{msg}"
        );
    }
}
