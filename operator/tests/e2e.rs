//! The operator end to end on a real cluster: `helm install` runs it as a pod under its
//! ServiceAccount (so the chart's RBAC is what is tested); the example InferenceService becomes
//! Ready engine pods that answer a completion; the operator reads their sidecars' pressure into
//! status; the scale subresource resizes the Deployment; with autoscaling on, idle spare pods
//! are drained and removed (load/tests/closed_loop.rs drives the loop with a trace), and the
//! policy's memory in status carries over to a new operator pod (and is cleared when
//! autoscaling is turned off); invalid services are refused by the API server or marked Degraded while valid ones keep
//! reconciling; a `helm upgrade` to two replicas of a new build rolls the operator, hands the
//! leader Lease over and fails over to the standby; an HPA on an autoscaled service makes
//! redline hold its replicas (ScalingActive False) until it goes; evictions (a node drain) take one engine
//! pod at a time (the PodDisruptionBudget); the spec's node selector and tolerations place the
//! pods (a tainted node); deleting a service garbage-collects its children; upgraded to watch
//! one namespace, the operator holds a Role there and nothing cluster-wide, and reconciles
//! only there.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::autoscaling::v1::HorizontalPodAutoscaler;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Secret, Service};
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, EvictParams, ListParams, Patch, PatchParams,
    PostParams,
};
use kube::{Api, Client};
use redline_operator::crd::{AutoscalingPolicy, AutoscalingSpec, InferenceService};
use redline_operator::{children, controller};
use redline_testcluster::testing::{self, client, repo, run_helm, wait_for, TestNs};
use serde_json::json;

const RELEASE_NS: &str = "redline-e2e";

fn example() -> InferenceService {
    let text = std::fs::read_to_string(repo().join("examples/smollm2.yaml")).unwrap();
    let mut i: InferenceService =
        serde_yaml::from_str(&text).expect("examples/smollm2.yaml is an InferenceService");
    // Starts observe-only: the scale subresource is tested before autoscaling is turned on.
    i.spec
        .autoscaling
        .as_mut()
        .expect("the example autoscales")
        .enabled = false;
    i
}

/// The example under another name, scaled to zero: a service the operator reconciles (its
/// Deployment appears) without starting an engine.
fn idle_example(name: &str) -> InferenceService {
    let mut i = example();
    i.metadata.name = Some(name.into());
    i.spec.replicas = Some(0);
    i.spec.min_replicas = 0;
    i
}

/// The cell of column `column` in the API server's table of InferenceService `name` (what
/// `kubectl get -o wide` prints), every column asked for.
async fn printed_column(client: &Client, ns: &str, name: &str, column: &str) -> String {
    let req = http::Request::get(format!(
        "/apis/redline.dev/v1alpha1/namespaces/{ns}/inferenceservices/{name}?includeObject=None"
    ))
    .header(
        "Accept",
        "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
    )
    .body(Vec::new())
    .unwrap();
    let table: serde_json::Value =
        serde_json::from_str(&client.request_text(req).await.expect("the table")).unwrap();
    let at = table["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .position(|c| c["name"] == column)
        .unwrap_or_else(|| panic!("no column {column}: {table}"));
    table["rows"][0]["cells"][at]
        .as_str()
        .unwrap_or_else(|| panic!("{table}"))
        .to_string()
}

/// Waits for the Deployment the operator makes for service `name`.
async fn wait_for_deployment(deployments: &Api<Deployment>, name: &str, what: &str) {
    wait_for(what, Duration::from_secs(30), || async {
        deployments
            .get_opt(name)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("absent".to_string())
    })
    .await;
}

async fn wait_ready_replicas(
    api: &Api<InferenceService>,
    name: &str,
    want: i32,
) -> InferenceService {
    wait_for(
        &format!("{name} with {want} ready replicas"),
        Duration::from_secs(120),
        || async {
            let i = api.get(name).await.map_err(|e| e.to_string())?;
            let st = i.status.clone().unwrap_or_default();
            let ready = st
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if st.ready_replicas == want && ready && st.observed_generation == i.metadata.generation
            {
                Ok(i)
            } else {
                Err(format!("{:?}", i.status))
            }
        },
    )
    .await
}

async fn engine_pods(client: &Client, ns: &str, name: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("redline.dev/inference-service={name}")))
        .await
        .unwrap()
        .items
}

/// PodDisruptionBudgets in the version this server serves (policy/v1beta1 on the local 1.20
/// cluster).
async fn disruption_budgets(client: &Client, ns: &str) -> Api<DynamicObject> {
    let api = controller::pdb_api(client)
        .await
        .unwrap()
        .expect("PodDisruptionBudgets served");
    Api::namespaced_with(client.clone(), ns, &api)
}

/// The condition `type_` of service `name` once its status is `want`.
async fn wait_condition(
    isvcs: &Api<InferenceService>,
    name: &str,
    type_: &str,
    want: &str,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    wait_for(
        &format!("{name}: {type_} {want}"),
        Duration::from_secs(60),
        || async {
            let i = isvcs.get(name).await.map_err(|e| e.to_string())?;
            match i
                .status
                .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == type_))
            {
                Some(c) if c.status == want => Ok(c),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

/// The spec places the engine pods as a pod spec would: with a node tainted the way GPU pools
/// are, a service that selects that node and tolerates the taint is scheduled there by the real
/// scheduler, one that does not tolerate it waits (ResourcesAvailable False, in the scheduler's
/// words), and a toleration the API server refuses marks the service Degraded with the
/// server's reason instead of retrying it (and its autoscaling holds). Untaints the node and deletes the services after.
async fn placement_follows_the_spec(client: &Client, ns: &str) {
    let isvcs: Api<InferenceService> = Api::namespaced(client.clone(), ns);
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.list(&ListParams::default()).await.unwrap().items[0]
        .metadata
        .name
        .clone()
        .unwrap();
    let _untaint = Tainted::new(&node, "redline.dev/e2e=placement:NoSchedule");
    let placed = |name: &str, tolerations: serde_json::Value| {
        let mut i = example();
        i.metadata.name = Some(name.into());
        // No GPU: the other node's devices may be taken, and this is about placement only.
        i.spec.resources = None;
        i.spec.node_selector = [("kubernetes.io/hostname".to_string(), node.clone())].into();
        i.spec.tolerations = serde_json::from_value(tolerations).unwrap();
        i
    };
    let tolerated = placed(
        "placed",
        json!([{"key": "redline.dev/e2e", "operator": "Equal", "value": "placement", "effect": "NoSchedule"}]),
    );
    let untolerated = placed("untolerated", json!([]));
    let mut rejected = placed(
        "bad-toleration",
        json!([{"key": "redline.dev/e2e", "operator": "Exists", "value": "placement"}]),
    );
    rejected.spec.autoscaling.as_mut().unwrap().enabled = true;
    for i in [&tolerated, &untolerated, &rejected] {
        isvcs.create(&PostParams::default(), i).await.unwrap();
    }
    let pod = wait_for(
        "placed: its pod scheduled",
        Duration::from_secs(60),
        || async {
            engine_pods(client, ns, "placed")
                .await
                .into_iter()
                .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
                .ok_or("not scheduled".to_string())
        },
    )
    .await;
    let spec = pod.spec.unwrap();
    assert_eq!(spec.node_name.as_deref(), Some(node.as_str()));
    assert!(
        spec.tolerations
            .unwrap_or_default()
            .iter()
            .any(|t| t.key.as_deref() == Some("redline.dev/e2e")),
        "the pod carries the service's toleration"
    );
    let waiting = wait_condition(&isvcs, "untolerated", "ResourcesAvailable", "False").await;
    assert_eq!(waiting.reason, "Unschedulable");
    assert!(waiting.message.contains("taint"), "{}", waiting.message);
    let degraded = wait_condition(&isvcs, "bad-toleration", "Degraded", "True").await;
    assert_eq!(degraded.reason, "InvalidSpec");
    assert!(
        degraded.message.contains("rejected the Deployment")
            && degraded.message.contains("tolerations"),
        "{}",
        degraded.message
    );
    assert!(
        Api::<Deployment>::namespaced(client.clone(), ns)
            .get_opt("bad-toleration")
            .await
            .unwrap()
            .is_none(),
        "no Deployment for a rejected spec"
    );
    // Its autoscaling holds: a decision could not be carried out.
    let held = wait_condition(&isvcs, "bad-toleration", "ScalingActive", "False").await;
    assert_eq!(held.reason, "InvalidSpec", "{}", held.message);
    for i in ["placed", "untolerated", "bad-toleration"] {
        isvcs.delete(i, &DeleteParams::default()).await.unwrap();
    }
}

/// `spec.apiKeySecret`: while the Secret is missing the service is Degraded (its pod waits to
/// mount it); once it exists the pod starts, the Degraded condition clears, and the engine
/// refuses the OpenAI API without the key (through the API server's pod proxy, which sends
/// the engine no key: any cluster) and answers with it (at the pod IP: the local cluster).
async fn api_keys_guard_the_engines(client: &Client, ns: &str) {
    let isvcs: Api<InferenceService> = Api::namespaced(client.clone(), ns);
    let mut keyed = example();
    keyed.metadata.name = Some("keyed".into());
    // No GPU and no sidecar: this is about the engine's API only.
    keyed.spec.resources = None;
    keyed.spec.sidecar.enabled = false;
    keyed.spec.api_key_secret =
        Some(serde_json::from_value(json!({"name": "keyed-keys"})).unwrap());
    isvcs.create(&PostParams::default(), &keyed).await.unwrap();
    let missing = wait_condition(&isvcs, "keyed", "Degraded", "True").await;
    assert_eq!(missing.reason, "ApiKeySecretNotFound");
    assert!(
        missing.message.contains("keyed-keys"),
        "{}",
        missing.message
    );

    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "keyed-keys"},
        "stringData": {"api-key": "sk-e2e-new\nsk-e2e-old\n"}
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    wait_ready_replicas(&isvcs, "keyed", 1).await;
    let cleared = wait_condition(&isvcs, "keyed", "Degraded", "False").await;
    assert_eq!(cleared.reason, "AsExpected");

    let pod = engine_pods(client, ns, "keyed").await.remove(0);
    let name = pod.metadata.name.clone().unwrap();
    let completion =
        json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0});
    let refused = testing::pod_http(
        client,
        ns,
        &name,
        8000,
        "POST",
        "/v1/completions",
        Some(completion.clone()),
    )
    .await;
    assert!(
        refused.is_err(),
        "a completion without the key: {refused:?}"
    );
    // Probes and scrapes need no key; the metrics say the engine itself refused the call (the
    // proxy does not pass its body on).
    let refusals = || async {
        let text = testing::pod_http(client, ns, &name, 8000, "GET", "/metrics", None)
            .await
            .expect("metrics need no key");
        redline_api::prom::Exposition::parse(&text)
            .unwrap()
            .sum("redline_engine_requests_unauthorized_total")
    };
    assert_eq!(refusals().await, Some(1.0));
    let ready = testing::pod_http(client, ns, &name, 8000, "GET", "/ready", None).await;
    assert!(ready.is_ok(), "readiness needs no key: {ready:?}");
    if testing::is_local_cluster() {
        let ip = pod.status.and_then(|s| s.pod_ip).unwrap();
        let url = format!("http://{ip}:8000/v1/completions");
        let http = reqwest::Client::new();
        for key in ["sk-e2e-new", "sk-e2e-old"] {
            let r = http
                .post(&url)
                .bearer_auth(key)
                .json(&completion)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "with {key}");
        }
        let wrong = http
            .post(&url)
            .bearer_auth("sk-e2e-wrong")
            .json(&completion)
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401);
        let body: serde_json::Value = wrong.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
        assert_eq!(refusals().await, Some(2.0));
    }
    isvcs
        .delete("keyed", &DeleteParams::default())
        .await
        .unwrap();
    secrets
        .delete("keyed-keys", &DeleteParams::default())
        .await
        .unwrap();
}

/// A node taint (`kubectl taint`), removed again when dropped, even by a failing test: a
/// tainted node would keep the next test's pods off it.
struct Tainted {
    node: String,
    key: String,
}

impl Tainted {
    fn new(node: &str, taint: &str) -> Self {
        testing::run_kubectl(&["taint", "nodes", node, taint]);
        Tainted {
            node: node.into(),
            key: taint.split('=').next().unwrap().into(),
        }
    }
}

impl Drop for Tainted {
    fn drop(&mut self) {
        // Not run_kubectl: a panic here, while unwinding, would abort the test binary.
        let _ = std::process::Command::new(testing::kubectl())
            .args(["taint", "nodes", &self.node, &format!("{}-", self.key)])
            .env("KUBECONFIG", testing::kubeconfig_path())
            .output();
    }
}

/// A node drain (evictions) takes the service's engine pods one at a time: the operator's
/// PodDisruptionBudget, counted by the real disruption controller and enforced by the API
/// server. Needs two ready pods; leaves one evicted (its ReplicaSet replaces it).
async fn evictions_take_one_pod_at_a_time(client: &Client, ns: &str, name: &str) {
    let pdbs = disruption_budgets(client, ns).await;
    wait_for(
        "the budget allowing one disruption of two healthy pods",
        Duration::from_secs(60),
        || async {
            let p = pdbs.get(name).await.map_err(|e| e.to_string())?;
            let st = &p.data["status"];
            if st["currentHealthy"] == 2 && st["disruptionsAllowed"] == 1 {
                Ok(())
            } else {
                Err(format!("status {st}"))
            }
        },
    )
    .await;
    let pods: Vec<String> = engine_pods(client, ns, name)
        .await
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.metadata.name)
        .collect();
    assert_eq!(pods.len(), 2, "{pods:?}");
    // The 429 as the server gives it, not retried until a replacement is ready.
    let api: Api<Pod> = Api::namespaced(testing::client_without_retries().await, ns);
    api.evict(&pods[0], &EvictParams::default())
        .await
        .expect("the first eviction");
    match api.evict(&pods[1], &EvictParams::default()).await {
        Err(kube::Error::Api(s)) if s.code == 429 => {
            assert!(s.message.contains("disruption budget"), "{s:?}")
        }
        other => panic!("the second pod was evicted beside the first: {other:?}"),
    }
}

async fn replicasets(client: &Client, ns: &str, name: &str) -> Vec<String> {
    let mut names: Vec<String> =
        Api::<k8s_openapi::api::apps::v1::ReplicaSet>::namespaced(client.clone(), ns)
            .list(&ListParams::default().labels(&format!("redline.dev/inference-service={name}")))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|r| r.metadata.name)
            .collect();
    names.sort();
    names
}

async fn lease_holder(leases: &Api<Lease>) -> Result<String, String> {
    leases
        .get("redline-operator")
        .await
        .map_err(|e| e.to_string())
        .map(|l| l.spec.and_then(|s| s.holder_identity).unwrap_or_default())
}

/// The one operator pod that leads (its `/readyz` says "leader", its gauge is 1, the Lease
/// names it; not `not`), when the two Ready pods of the upgraded release are one leader and
/// one standby.
async fn one_leader(
    client: &Client,
    leases: &Api<Lease>,
    not: Option<&str>,
) -> Result<String, String> {
    let pods = Api::<Pod>::namespaced(client.clone(), RELEASE_NS)
        .list(&ListParams::default().labels("app.kubernetes.io/name=redline-operator"))
        .await
        .map_err(|e| e.to_string())?
        .items;
    let mut roles = Vec::new();
    for p in pods.iter().filter(|p| testing::is_ready(p)) {
        let name = p.metadata.name.clone().unwrap();
        let image = p.spec.as_ref().unwrap().containers[0].image.clone();
        let get = |path: &'static str| {
            testing::pod_http(client, RELEASE_NS, &name, 8080, "GET", path, None)
        };
        let role = get("/readyz").await.unwrap_or_else(|e| e);
        let gauge = get("/metrics")
            .await
            .unwrap_or_default()
            .lines()
            .any(|l| l == "redline_operator_leader 1");
        roles.push((name, image, role, gauge));
    }
    let lease = lease_holder(leases).await?;
    let upgraded = roles.iter().all(|(_, image, _, _)| {
        image
            .as_deref()
            .is_some_and(|i| i.ends_with(":e2e-upgrade"))
    });
    let leaders: Vec<&String> = roles
        .iter()
        .filter(|(_, _, role, gauge)| role == "leader" && *gauge)
        .map(|(name, ..)| name)
        .collect();
    let standbys = roles
        .iter()
        .filter(|(_, _, role, gauge)| role == "standby" && !*gauge)
        .count();
    match leaders.as_slice() {
        [name]
            if roles.len() == 2
                && upgraded
                && standbys == 1
                && **name == lease
                && not != Some(name.as_str()) =>
        {
            Ok((*name).clone())
        }
        _ => Err(format!("lease {lease:?}, pods {roles:?}")),
    }
}

#[tokio::test]
async fn helm_installed_operator_serves_scales_validates_and_cleans_up() {
    let client = client().await;
    let lint = run_helm(&["lint", repo().join("charts/redline").to_str().unwrap()]);
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
    // The operator runs as a pod with the chart's ServiceAccount.
    let op_pods = Api::<Pod>::namespaced(client.clone(), RELEASE_NS);
    let op = testing::install_operator(&client, RELEASE_NS).await;
    assert_eq!(
        op.spec.as_ref().unwrap().service_account_name.as_deref(),
        Some("redline-operator")
    );

    let ns = TestNs::new(&client, "rl-e2e").await;
    let _logs = testing::LogsOnPanic::operator_and(RELEASE_NS, &ns.name);
    let isvcs: Api<InferenceService> = Api::namespaced(client.clone(), &ns.name);
    let isvc = isvcs
        .create(&PostParams::default(), &example())
        .await
        .unwrap();
    let name = isvc.metadata.name.clone().unwrap();
    let ready = wait_ready_replicas(&isvcs, &name, 1).await;
    assert_eq!(
        ready.status.as_ref().unwrap().selector.as_deref(),
        Some("redline.dev/inference-service=smollm2")
    );
    assert_eq!(
        ready.status.as_ref().unwrap().url,
        Some(format!("http://smollm2.{}.svc:8000", ns.name))
    );

    // One Created Event per child, however often the reconciler applied them since (every
    // status change of the Deployment reconciles again): an apply that creates is told from
    // one that updates by the API server's answer (201 or 200).
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns.name)
        .list(&ListParams::default())
        .await
        .unwrap();
    for what in ["Deployment", "Service", "PodDisruptionBudget", "Secret"] {
        let created: Vec<_> = events
            .items
            .iter()
            .filter(|e| {
                e.reason.as_deref() == Some("Created")
                    && e.note
                        .as_deref()
                        .is_some_and(|n| n.starts_with(&format!("created {what} ")))
            })
            .collect();
        assert_eq!(created.len(), 1, "{what}: {created:?}");
        assert!(
            created[0].series.is_none(),
            "{what} created more than once: {:?}",
            created[0].series
        );
    }

    // The engine pod answers a completion (through the pod proxy: works on any cluster).
    let pods = engine_pods(&client, &ns.name, &name).await;
    assert_eq!(pods.len(), 1);
    let pod = pods[0].metadata.name.clone().unwrap();
    let answer = testing::pod_http(
        &client,
        &ns.name,
        &pod,
        8000,
        "POST",
        "/v1/completions",
        Some(json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})),
    )
    .await
    .unwrap();
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 8, "{answer}");
    assert!(
        answer["choices"][0]["text"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{answer}"
    );

    // The pressure sidecar next to it reads the engine over the pod's localhost; its pressure
    // API needs the token from the operator's Secret.
    let sidecar_metrics = wait_for(
        "the sidecar scraping the engine",
        Duration::from_secs(30),
        || async {
            let m =
                testing::pod_http(&client, &ns.name, &pod, 8090, "GET", "/metrics", None).await?;
            if m.lines().any(|l| l == "redline_sidecar_engine_up 1") {
                Ok(m)
            } else {
                Err(m)
            }
        },
    )
    .await;
    assert!(
        sidecar_metrics.contains("redline_sidecar_kv_usage_ratio"),
        "{sidecar_metrics}"
    );
    // Through the proxy (whose Authorization header is the API server's) the pressure API
    // refuses, and the sidecar counts the refusal.
    let unauthorized =
        testing::pod_http(&client, &ns.name, &pod, 8090, "GET", "/v1/pressure", None).await;
    assert!(unauthorized.is_err(), "{unauthorized:?}");
    let m = testing::pod_http(&client, &ns.name, &pod, 8090, "GET", "/metrics", None)
        .await
        .unwrap();
    assert!(
        m.lines()
            .any(|l| l == "redline_sidecar_unauthorized_requests_total 1"),
        "{m}"
    );

    // The operator, in its own pod, reads that pressure API at the pod IP with the token, and
    // reports it in status (autoscaling is off: it observes, scales nothing).
    let observed = wait_for(
        "status from the sidecars' pressure",
        Duration::from_secs(60),
        || async {
            let i = isvcs.get(&name).await.map_err(|e| e.to_string())?;
            let st = i.status.clone().unwrap_or_default();
            let near = st.conditions.iter().find(|c| c.type_ == "NearRedline");
            match (&st.kv_usage, near) {
                (Some(_), Some(c)) if c.status == "False" && c.reason == "BelowRedline" => Ok(st),
                _ => Err(format!("{st:?}")),
            }
        },
    )
    .await;
    assert!(observed.kv_usage.as_deref().unwrap().ends_with('%'));
    assert_eq!(observed.pod_limits.len(), 1, "{observed:?}");
    assert_eq!(observed.pod_limits[0].pod, pod);
    assert!(
        observed.last_decision.is_none(),
        "nothing decided while off"
    );
    // The reconciler's conditions and the loop's live side by side (a map keyed by type).
    for t in [
        "Ready",
        "Progressing",
        "Degraded",
        "NearRedline",
        "ResourcesAvailable",
        "ScalingActive",
    ] {
        assert!(
            observed.conditions.iter().any(|c| c.type_ == t),
            "{t}: {observed:?}"
        );
    }

    // A drain nobody holds (one under way when autoscaling was turned off, as here, or an
    // earlier leader's) would keep the pod out of service for good: the operator, though it
    // scales nothing, serves the pod again and says so. (Local cluster: the pod IP.)
    if testing::is_local_cluster() {
        let sidecar = testing::Sidecar::at(
            &client,
            &pods[0],
            &children::token_secret_name(&isvc),
            children::SIDECAR_PORT as u16,
        )
        .await;
        sidecar.set_drain(true).await;
        wait_for(
            "a drain nobody holds cancelled",
            Duration::from_secs(60),
            || async {
                let drain = sidecar.draining().await?;
                let p = Api::<Pod>::namespaced(client.clone(), &ns.name)
                    .get(&pod)
                    .await
                    .map_err(|e| e.to_string())?;
                let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(
                    client.clone(),
                    &ns.name,
                )
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
                let said = events.items.iter().any(|e| {
                    e.reason.as_deref() == Some("DrainCancelled")
                        && e.note.as_deref().is_some_and(|n| n.contains(&pod))
                });
                if !drain && testing::is_ready(&p) && said {
                    Ok(())
                } else {
                    Err(format!(
                        "drain {drain}, ready {}, Event {said}",
                        testing::is_ready(&p)
                    ))
                }
            },
        )
        .await;
    }

    // `kubectl scale` (the scale subresource, which HPA and KEDA use too) resizes the Deployment.
    let scaled = testing::run_kubectl(&[
        "scale",
        &format!("inferenceservice/{name}"),
        "--replicas=2",
        "--namespace",
        &ns.name,
    ]);
    assert!(scaled.contains("scaled"), "{scaled}");
    wait_ready_replicas(&isvcs, &name, 2).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    assert_eq!(
        deployments.get(&name).await.unwrap().spec.unwrap().replicas,
        Some(2)
    );
    evictions_take_one_pod_at_a_time(&client, &ns.name, &name).await;
    wait_ready_replicas(&isvcs, &name, 2).await;
    // Beyond maxReplicas (3) is clamped.
    isvcs
        .patch_scale(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 7}})),
        )
        .await
        .unwrap();
    wait_for(
        "Deployment clamped to maxReplicas",
        Duration::from_secs(30),
        || async {
            let r = deployments
                .get(&name)
                .await
                .map_err(|e| e.to_string())?
                .spec
                .unwrap()
                .replicas;
            if r == Some(3) {
                Ok(())
            } else {
                Err(format!("{r:?}"))
            }
        },
    )
    .await;
    wait_ready_replicas(&isvcs, &name, 3).await;

    // redline's own autoscaling on, idle pods: after its (here 10 s) window it drains the two
    // spare pods through their sidecars and scales 3 -> 1 once they are empty.
    isvcs
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"autoscaling": {"enabled": true, "policy": {
                "scaleDownWindowSeconds": 10, "forecastHorizonSeconds": 10}}}})),
        )
        .await
        .unwrap();
    let scaled = wait_for(
        "the autoscaler draining and scaling down to minReplicas",
        Duration::from_secs(120),
        || async {
            let i = isvcs.get(&name).await.map_err(|e| e.to_string())?;
            let st = i.status.clone().unwrap_or_default();
            match &st.last_decision {
                Some(d) if d.summary == "scale 3->1" && i.spec.replicas == Some(1) => Ok(st),
                _ => Err(format!("replicas {:?}, {st:?}", i.spec.replicas)),
            }
        },
    )
    .await;
    assert!(scaled.last_decision.unwrap().reason.contains("drained"));
    wait_ready_replicas(&isvcs, &name, 1).await;
    wait_for("the drained pods gone", Duration::from_secs(60), || async {
        let n = engine_pods(&client, &ns.name, &name).await.len();
        if n == 1 {
            Ok(())
        } else {
            Err(format!("{n} pods"))
        }
    })
    .await;
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns.name)
        .list(&ListParams::default())
        .await
        .unwrap();
    for reason in ["Draining", "ScaledDown"] {
        assert!(
            events
                .items
                .iter()
                .any(|e| e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())),
            "no {reason} event"
        );
    }

    // The policy's memory is in status, and a new leader goes on from it: the operator's pod
    // deleted (a node lost, a rolling update), the one the Deployment starts instead keeps the
    // scale-down that was made and the window in force, where a policy of its own would have
    // written none. Checked once it has passed the service twice (its gauges and its pass
    // count say so).
    let memory = scaled
        .autoscaler_memory
        .clone()
        .expect("status.autoscalerMemory");
    assert!(memory.last_scale_down_time.is_some(), "{memory:?}");
    assert_eq!(memory.scale_down_window_seconds, 10);
    assert!(memory.draining.is_empty(), "{memory:?}");
    let old_op = op.metadata.name.clone().unwrap();
    op_pods
        .delete(&old_op, &DeleteParams::default())
        .await
        .unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NS);
    let (op, with_history, without) = wait_for(
        "a new operator pod leading, and past the service twice",
        Duration::from_secs(90),
        || async {
            let holder = lease_holder(&leases).await?;
            if holder == old_op || holder.is_empty() {
                return Err(format!("lease held by {holder:?}"));
            }
            let pod = op_pods.get(&holder).await.map_err(|e| e.to_string())?;
            let m = testing::pod_http(&client, RELEASE_NS, &holder, 8080, "GET", "/metrics", None)
                .await
                .map_err(|e| e.to_string())?;
            let m = redline_api::prom::Exposition::parse(&m).map_err(|e| e.0)?;
            let passes = m
                .histogram("redline_operator_autoscale_pass_duration_seconds")
                .map_or(0, |h| h.count);
            let restored = |from: &str| {
                m.sum_where(
                    "redline_operator_policies_restored_total",
                    &[("from", from)],
                )
                .unwrap_or(0.0)
            };
            let passed = m
                .sum_where(
                    "redline_operator_service_desired_replicas",
                    &[
                        ("namespace", ns.name.as_str()),
                        ("inferenceservice", name.as_str()),
                    ],
                )
                .is_some();
            if passed && passes >= 2 {
                Ok((pod, restored("memory_and_history"), restored("memory")))
            } else {
                Err(format!(
                    "{holder}: {passes} passes, the service's gauges {passed}"
                ))
            }
        },
    )
    .await;
    let kept = isvcs
        .get(&name)
        .await
        .unwrap()
        .status
        .unwrap_or_default()
        .autoscaler_memory
        .expect("status.autoscalerMemory after the new leader's passes");
    assert_eq!(
        (&kept.last_scale_down_time, kept.scale_down_window_seconds),
        (&memory.last_scale_down_time, 10),
        "the new leader's memory"
    );
    // The old pod, stopped while it led, handed its demand history over as well: the new
    // leader went on from it, and its first write removed it.
    assert_eq!(kept.demand_history, None, "the history left in status");
    assert!(
        with_history >= 1.0 && without == 0.0,
        "policies restored: {with_history} with the history, {without} without"
    );

    // The same as gauges on the operator's /metrics, per service (a Prometheus plots load
    // against replicas from them), as of the loop's last pass: one replica decided and
    // serving, an idle demand under it, the pods' KV usage, and the burn of the example's
    // TTFT objective's error budget.
    let op_name = op.metadata.name.clone().unwrap();
    let gauges = wait_for(
        "the service's gauges at one replica",
        Duration::from_secs(20),
        || async {
            let m = testing::pod_http(&client, RELEASE_NS, &op_name, 8080, "GET", "/metrics", None)
                .await
                .map_err(|e| e.to_string())?;
            let m = redline_api::prom::Exposition::parse(&m).map_err(|e| e.0)?;
            let of = |g: &str| {
                m.sum_where(
                    &format!("redline_operator_service_{g}"),
                    &[
                        ("namespace", ns.name.as_str()),
                        ("inferenceservice", name.as_str()),
                    ],
                )
            };
            let got: Vec<Option<f64>> = [
                "desired_replicas",
                "ready_replicas",
                "demand_replicas",
                "forecast_replicas",
                "kv_usage_ratio",
                "error_budget_burn_rate",
            ]
            .iter()
            .map(|g| of(g))
            .collect();
            match got[..2] {
                [Some(1.0), Some(1.0)] => Ok(got),
                _ => Err(format!("{got:?}")),
            }
        },
    )
    .await;
    let demand = gauges[2].expect("the policy's demand");
    assert!((0.0..1.0).contains(&demand), "idle demand {demand}");
    assert!(gauges[3].is_some(), "the forecast");
    let kv = gauges[4].expect("the pods' KV usage");
    assert!((0.0..0.5).contains(&kv), "idle KV usage {kv}");
    assert!(gauges[5].is_some(), "the error budget's burn");

    // An HPA pointed at the autoscaled service (as a KEDA ScaledObject would make): two
    // writers of its replicas. redline holds off and says so, once; it scales again once the
    // HPA is gone. (With no metrics API here, the HPA itself scales nothing.)
    assert_eq!(
        wait_condition(&isvcs, &name, "ScalingActive", "True")
            .await
            .reason,
        "Autoscaling"
    );
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns.name);
    let hpa: HorizontalPodAutoscaler = serde_json::from_value(json!({
        "metadata": {"name": "smollm2-hpa"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "redline.dev/v1alpha1", "kind": "InferenceService", "name": name},
            "minReplicas": 1, "maxReplicas": 2, "targetCPUUtilizationPercentage": 50
        }
    }))
    .unwrap();
    hpas.create(&PostParams::default(), &hpa).await.unwrap();
    let held = wait_condition(&isvcs, &name, "ScalingActive", "False").await;
    assert_eq!(held.reason, "ConflictingAutoscaler");
    assert!(held.message.contains("smollm2-hpa"), "{}", held.message);
    tokio::time::sleep(Duration::from_secs(11)).await; // two more passes see it
    let warned = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns.name)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("ConflictingAutoscaler"))
        .map(|e| e.series.map_or(1, |s| s.count))
        .sum::<i32>();
    assert_eq!(warned, 1, "one Warning Event for the episode");
    // `kubectl get infsvc -o wide` says why: the API server's own table (server-side
    // printing of the CRD's columns), as kubectl asks for it.
    assert_eq!(
        printed_column(&client, &ns.name, &name, "Scaling").await,
        "ConflictingAutoscaler"
    );
    // Held, not off: the policy's memory stays for when it goes on.
    let held_memory = isvcs
        .get(&name)
        .await
        .unwrap()
        .status
        .and_then(|s| s.autoscaler_memory)
        .expect("the policy's memory kept while an HPA holds redline off");
    assert_eq!(
        held_memory.last_scale_down_time, kept.last_scale_down_time,
        "{held_memory:?}"
    );
    hpas.delete("smollm2-hpa", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(
        wait_condition(&isvcs, &name, "ScalingActive", "True")
            .await
            .reason,
        "Autoscaling"
    );

    isvcs
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"autoscaling": {"enabled": false}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        wait_condition(&isvcs, &name, "ScalingActive", "False")
            .await
            .reason,
        "AutoscalingDisabled"
    );
    wait_for(
        "the policy's memory gone from status with autoscaling off",
        Duration::from_secs(20),
        || async {
            let i = isvcs.get(&name).await.map_err(|e| e.to_string())?;
            match i.status.and_then(|s| s.autoscaler_memory) {
                None => Ok(()),
                Some(m) => Err(format!("{m:?}")),
            }
        },
    )
    .await;

    // Invalid services: refused by the API server's schema (raw JSON, as kubectl would send)...
    let raw: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns.name,
        &ApiResource::erase::<InferenceService>(&()),
    );
    let example_json = || {
        let mut v = serde_json::to_value(example()).unwrap();
        v["metadata"]["name"] = json!("bad");
        v
    };
    for (what, edit) in [
        (
            "negative size",
            Box::new(|v: &mut serde_json::Value| v["spec"]["engine"]["kvCacheMib"] = json!(-1))
                as Box<dyn Fn(&mut serde_json::Value)>,
        ),
        (
            "missing model",
            Box::new(|v: &mut serde_json::Value| {
                v["spec"].as_object_mut().unwrap().remove("model");
            }),
        ),
        (
            "wrong type",
            Box::new(|v: &mut serde_json::Value| v["spec"]["maxReplicas"] = json!("many")),
        ),
        (
            "unknown KV dtype",
            Box::new(|v: &mut serde_json::Value| {
                v["spec"]["engine"]["kvCacheDtype"] = json!("bf16")
            }),
        ),
    ] {
        let mut v = example_json();
        edit(&mut v);
        let obj: DynamicObject = serde_json::from_value(v).unwrap();
        let err = raw
            .create(&PostParams::default(), &obj)
            .await
            .expect_err(what);
        assert!(
            err.to_string().contains("Invalid") || err.to_string().contains("Required"),
            "{what}: {err}"
        );
    }
    // An unknown field is pruned by the structural schema (a 1.20 server prunes rather than
    // rejects; strict field validation is 1.25+), so it can never reach the operator.
    let mut v = example_json();
    v["metadata"]["name"] = json!("pruned");
    v["spec"]["sidecar"]["enabled"] = json!(false);
    v["spec"]["replicas"] = json!(0);
    v["spec"]["minReplicas"] = json!(0);
    v["spec"]["bogusField"] = json!(1);
    let created = raw
        .create(&PostParams::default(), &serde_json::from_value(v).unwrap())
        .await
        .unwrap();
    assert!(
        created.data["spec"].get("bogusField").is_none(),
        "unknown field kept: {:?}",
        created.data
    );
    // ...or marked Degraded by the operator, while a valid one created after it reconciles.
    let mut inverted = example();
    inverted.metadata.name = Some("inverted".into());
    inverted.spec.min_replicas = 3;
    inverted.spec.max_replicas = 1;
    isvcs
        .create(&PostParams::default(), &inverted)
        .await
        .unwrap();
    let mut other = idle_example("other");
    other.spec.autoscaling = Some(AutoscalingSpec {
        enabled: false,
        policy_ref: Some("shared".into()),
        policy: None,
    });
    isvcs.create(&PostParams::default(), &other).await.unwrap();
    let degraded = wait_condition(&isvcs, "inverted", "Degraded", "True").await;
    assert_eq!(degraded.reason, "InvalidSpec");
    assert!(
        degraded
            .message
            .contains("minReplicas (3) is greater than maxReplicas (1)"),
        "{}",
        degraded.message
    );
    assert!(
        deployments.get_opt("inverted").await.unwrap().is_none(),
        "no children for an invalid spec"
    );
    wait_for_deployment(&deployments, "other", "other's Deployment").await;

    // A missing AutoscalingPolicy is reported; creating it clears that (the policy watch).
    let degraded_reason = |i: InferenceService| {
        i.status
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Degraded"))
            .map(|c| (c.status, c.reason))
    };
    wait_for("other: PolicyNotFound", Duration::from_secs(30), || async {
        let r = degraded_reason(isvcs.get("other").await.map_err(|e| e.to_string())?);
        if r == Some(("True".into(), "PolicyNotFound".into())) {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
    let policy: AutoscalingPolicy = serde_json::from_value(json!({
        "apiVersion": "redline.dev/v1alpha1", "kind": "AutoscalingPolicy",
        "metadata": {"name": "shared"}, "spec": {"targetKvUsage": 0.6}
    }))
    .unwrap();
    Api::<AutoscalingPolicy>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    wait_for("other: policy found", Duration::from_secs(30), || async {
        let r = degraded_reason(isvcs.get("other").await.map_err(|e| e.to_string())?);
        if r == Some(("False".into(), "AsExpected".into())) {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;

    // A pod no node has room for (3 GPUs; no node has more than 2): ResourcesAvailable turns
    // False in the scheduler's words, with one Warning Event however many passes see it, and
    // True again once the service asks for nothing it cannot get.
    // Counted from here: an operator left running by an earlier, failed run carries its counts.
    let op_metrics = || async {
        let m = testing::pod_http(&client, RELEASE_NS, &op_name, 8080, "GET", "/metrics", None)
            .await
            .unwrap();
        redline_api::prom::Exposition::parse(&m).unwrap()
    };
    let unschedulable_events = || async {
        op_metrics()
            .await
            .sum_where(
                "redline_operator_events_total",
                &[("reason", "Unschedulable")],
            )
            .unwrap_or(0.0)
    };
    let passes = || async {
        op_metrics()
            .await
            .histogram("redline_operator_autoscale_pass_duration_seconds")
            .unwrap_or_default()
    };
    let before = unschedulable_events().await;
    let passes_before = passes().await;
    let mut big = example();
    big.metadata.name = Some("too-big".into());
    big.spec.resources =
        Some(serde_json::from_value(json!({"limits": {"nvidia.com/gpu": "3"}})).unwrap());
    isvcs.create(&PostParams::default(), &big).await.unwrap();
    let unavailable = wait_condition(&isvcs, "too-big", "ResourcesAvailable", "False").await;
    assert_eq!(unavailable.reason, "Unschedulable");
    assert!(
        unavailable.message.contains("Insufficient nvidia.com/gpu"),
        "{}",
        unavailable.message
    );
    // Three more passes of the loop (5 s apart) see it still waiting.
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert_eq!(
        unschedulable_events().await - before,
        1.0,
        "one Unschedulable Event however many passes see it"
    );
    // And the loop kept its 5 s pace meanwhile: no pass longer than the interval.
    let passes_after = passes().await;
    let (n, slow) = (
        passes_after.count - passes_before.count,
        passes_after.count - passes_after.at_most(5.0).unwrap_or(0),
    );
    let slow_before = passes_before.count - passes_before.at_most(5.0).unwrap_or(0);
    assert!(n >= 3, "{n} autoscaling passes in 16 s");
    assert_eq!(slow - slow_before, 0, "passes over 5 s: {passes_after:?}");
    isvcs
        .patch(
            "too-big",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0, "minReplicas": 0}})),
        )
        .await
        .unwrap();
    wait_condition(&isvcs, "too-big", "ResourcesAvailable", "True").await;
    assert_eq!(
        wait_condition(&isvcs, &name, "ResourcesAvailable", "True")
            .await
            .reason,
        "Scheduled",
        "the service whose pod runs"
    );

    placement_follows_the_spec(&client, &ns.name).await;
    api_keys_guard_the_engines(&client, &ns.name).await;

    // The API server restarts (local cluster only: a kind control plane is not ours to
    // restart): the operator recovers without crashing, reconciles a service created afterwards,
    // and leaves exactly the children it had.
    if testing::is_local_cluster() {
        let rs_before = replicasets(&client, &ns.name, &name).await;
        testing::redline_cluster(&["restart-apiserver", "--down-seconds", "3"]);
        let after = idle_example("after-restart");
        wait_for(
            "creating a service after the restart",
            Duration::from_secs(30),
            || async {
                isvcs
                    .create(&PostParams::default(), &after)
                    .await
                    .map_err(|e| e.to_string())
            },
        )
        .await;
        wait_for(
            "after-restart reconciled",
            Duration::from_secs(60),
            || async {
                let i = isvcs
                    .get("after-restart")
                    .await
                    .map_err(|e| e.to_string())?;
                let seen = i.status.as_ref().and_then(|s| s.observed_generation);
                if seen == i.metadata.generation
                    && deployments
                        .get_opt("after-restart")
                        .await
                        .map_err(|e| e.to_string())?
                        .is_some()
                {
                    Ok(())
                } else {
                    Err(format!("{:?}", i.status))
                }
            },
        )
        .await;
        wait_ready_replicas(&isvcs, &name, 1).await;
        assert_eq!(
            replicasets(&client, &ns.name, &name).await,
            rs_before,
            "no new ReplicaSets: children unchanged"
        );
        let op = op_pods
            .get(op.metadata.name.as_deref().unwrap())
            .await
            .unwrap();
        let restarts: i32 = op
            .status
            .unwrap()
            .container_statuses
            .unwrap()
            .iter()
            .map(|c| c.restart_count)
            .sum();
        assert_eq!(restarts, 0, "the operator recovered in place");
    }

    // `helm upgrade` to a new build (a new image tag) and two replicas: the rolling update
    // finishes (`--wait`: the new pods are Ready, the standby too), the old pod lets the lease
    // go as it stops instead of leaving it to expire, exactly one new pod leads, the new leader
    // reconciles, and when it is deleted the standby takes over.
    let old_op = op.metadata.name.clone().unwrap();
    assert_eq!(lease_holder(&leases).await.unwrap(), old_op);
    upgrade_release(&["--set", "image.tag=e2e-upgrade", "--set", "replicas=2"]);
    wait_for(
        "the old operator pod gone",
        Duration::from_secs(60),
        || async {
            match op_pods.get_opt(&old_op).await {
                Ok(None) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    // Without the release it would hold the lease for up to 15 s after its process exited.
    assert_ne!(
        lease_holder(&leases).await.unwrap(),
        old_op,
        "the stopped leader kept the lease"
    );
    let new_leader = wait_for(
        "one new operator pod leading, one standing by",
        Duration::from_secs(45),
        || one_leader(&client, &leases, None),
    )
    .await;
    isvcs
        .create(&PostParams::default(), &idle_example("after-upgrade"))
        .await
        .unwrap();
    wait_for_deployment(
        &deployments,
        "after-upgrade",
        "after-upgrade reconciled by the new leader",
    )
    .await;
    op_pods
        .delete(&new_leader, &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the standby leading after the leader's pod was deleted",
        Duration::from_secs(60),
        || one_leader(&client, &leases, Some(&new_leader)),
    )
    .await;

    // Deleting the service garbage-collects its Deployment, Service and PodDisruptionBudget
    // (owner references).
    let pdbs = disruption_budgets(&client, &ns.name).await;
    assert!(pdbs.get_opt(&name).await.unwrap().is_some());
    isvcs
        .delete(&name, &DeleteParams::foreground())
        .await
        .unwrap();
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    wait_for(
        "children garbage-collected",
        Duration::from_secs(60),
        || async {
            let d = deployments
                .get_opt(&name)
                .await
                .map_err(|e| e.to_string())?;
            let s = services.get_opt(&name).await.map_err(|e| e.to_string())?;
            let b = pdbs.get_opt(&name).await.map_err(|e| e.to_string())?;
            let p = engine_pods(&client, &ns.name, &name).await;
            if d.is_none() && s.is_none() && b.is_none() && p.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "deployment {}, service {}, budget {}, {} pods",
                    d.is_some(),
                    s.is_some(),
                    b.is_some(),
                    p.len()
                ))
            }
        },
    )
    .await;
    watching_one_namespace(&client, &ns.name).await;
    run_helm(&["uninstall", "redline", "--namespace", RELEASE_NS, "--wait"]);
}

/// `helm upgrade` of the release with `flags`, once its rollout is done.
fn upgrade_release(flags: &[&str]) {
    let chart = repo().join("charts/redline");
    let mut args = vec![
        "upgrade",
        "redline",
        chart.to_str().unwrap(),
        "--namespace",
        RELEASE_NS,
    ];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--wait", "--timeout", "90s"]);
    run_helm(&args);
}

/// Whether the operator's ServiceAccount may `verb` `resource` (of `group`) in `ns` (every
/// namespace: `None`), as the API server's own authorizer answers.
async fn operator_may(
    client: &Client,
    verb: &str,
    group: &str,
    resource: &str,
    ns: Option<&str>,
) -> bool {
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "spec": {
            "user": format!("system:serviceaccount:{RELEASE_NS}:redline-operator"),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{RELEASE_NS}"), "system:authenticated"],
            "resourceAttributes": {"verb": verb, "group": group, "resource": resource, "namespace": ns},
        }
    }))
    .unwrap();
    Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .is_some_and(|s| s.allowed)
}

/// The release upgraded to `watchNamespace`: the operator runs under a Role in that namespace
/// and nothing cluster-wide (the API server's access review says so), reconciles a service
/// created there, and leaves alone one created in `other` (watched until now) first.
async fn watching_one_namespace(client: &Client, other: &str) {
    let scoped = TestNs::new(client, "rl-e2e-scoped").await;
    upgrade_release(&[
        "--reuse-values",
        "--set",
        &format!("watchNamespace={}", scoped.name),
        "--set",
        "replicas=1",
    ]);
    let here = Some(scoped.name.as_str());
    for (verb, group, resource) in [
        ("list", "redline.dev", "inferenceservices"),
        ("patch", "redline.dev", "inferenceservices/status"),
        ("create", "apps", "deployments"),
        ("delete", "", "pods"),
    ] {
        assert!(
            operator_may(client, verb, group, resource, here).await,
            "{verb} {resource} in the watched namespace"
        );
        for ns in [None, Some(other)] {
            assert!(
                !operator_may(client, verb, group, resource, ns).await,
                "{verb} {resource} in {ns:?}: only the watched namespace"
            );
        }
    }
    let op_pods = Api::<Pod>::namespaced(client.clone(), RELEASE_NS);
    let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NS);
    wait_for(
        "one operator pod, watching the namespace, leading",
        Duration::from_secs(60),
        || async {
            let pods = op_pods
                .list(&ListParams::default().labels("app.kubernetes.io/name=redline-operator"))
                .await
                .map_err(|e| e.to_string())?
                .items;
            let env = |p: &Pod| {
                p.spec.as_ref().unwrap().containers[0]
                    .env
                    .clone()
                    .unwrap_or_default()
            };
            let holder = lease_holder(&leases).await?;
            match pods.as_slice() {
                [p] if testing::is_ready(p)
                    && env(p).iter().any(|e| {
                        e.name == "WATCH_NAMESPACE" && e.value.as_deref() == Some(&scoped.name)
                    })
                    && p.metadata.name.as_deref() == Some(holder.as_str()) =>
                {
                    Ok(())
                }
                _ => Err(format!("{} pods, lease {holder:?}", pods.len())),
            }
        },
    )
    .await;
    let unwatched: Api<InferenceService> = Api::namespaced(client.clone(), other);
    unwatched
        .create(&PostParams::default(), &idle_example("unwatched"))
        .await
        .unwrap();
    Api::<InferenceService>::namespaced(client.clone(), &scoped.name)
        .create(&PostParams::default(), &idle_example("scoped"))
        .await
        .unwrap();
    wait_for_deployment(
        &Api::namespaced(client.clone(), &scoped.name),
        "scoped",
        "the service in the watched namespace reconciled",
    )
    .await;
    // Created first, and given the time the watched one took and more.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let left = unwatched.get("unwatched").await.unwrap();
    assert!(left.status.is_none(), "{:?}", left.status);
    assert!(Api::<Deployment>::namespaced(client.clone(), other)
        .get_opt("unwatched")
        .await
        .unwrap()
        .is_none());
    unwatched
        .delete("unwatched", &DeleteParams::default())
        .await
        .unwrap();
}
