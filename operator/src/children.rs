//! What an InferenceService owns, as plain functions of its spec: the Deployment of engine
//! (+ sidecar) pods, the Service in front of them, the Secret with the sidecar's bearer token.
//! Applied by the reconciler with server-side apply; no I/O here.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, HTTPGetAction, HostPathVolumeSource, KeyToPath,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    SeccompProfile, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ApiResource, DynamicObject};
use kube::{Resource, ResourceExt};

use crate::crd::{EngineSettings, InferenceService};
use crate::validate::effective_replicas;

/// Label carrying the InferenceService's name on every child and pod.
pub const SERVICE_LABEL: &str = "redline.dev/inference-service";
pub const ENGINE_PORT: i32 = 8000;
pub const SIDECAR_PORT: i32 = 8090;
/// Non-root uid the containers run as (distroless `nonroot`).
pub const RUN_AS: i64 = 65532;
const TOKEN_DIR: &str = "/var/run/secrets/redline";
const MODEL_DIR: &str = "/var/lib/redline/model";
/// Where the engine reads its API keys (`spec.apiKeySecret`), apart from the sidecar's token.
const API_KEYS_DIR: &str = "/var/run/secrets/redline-api";

/// Operator-wide defaults (Helm values).
#[derive(Clone, Debug)]
pub struct Defaults {
    pub engine_image: String,
    pub sidecar_image: String,
}

impl Default for Defaults {
    fn default() -> Self {
        let v = env!("CARGO_PKG_VERSION");
        Self {
            engine_image: format!("ghcr.io/redline/engine:{v}"),
            sidecar_image: format!("ghcr.io/redline/sidecar:{v}"),
        }
    }
}

pub fn labels(isvc: &InferenceService) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "redline-engine".to_string()),
        ("app.kubernetes.io/instance", isvc.name_any()),
        (
            "app.kubernetes.io/managed-by",
            "redline-operator".to_string(),
        ),
        (SERVICE_LABEL, isvc.name_any()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The pods' selector, also published in status for the scale subresource.
pub fn selector(isvc: &InferenceService) -> BTreeMap<String, String> {
    [(SERVICE_LABEL.to_string(), isvc.name_any())].into()
}

pub fn selector_string(isvc: &InferenceService) -> String {
    format!("{SERVICE_LABEL}={}", isvc.name_any())
}

pub fn token_secret_name(isvc: &InferenceService) -> String {
    format!("{}-sidecar-token", isvc.name_any())
}

fn meta(isvc: &InferenceService, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: isvc.namespace(),
        labels: Some(labels(isvc)),
        owner_references: Some(vec![owner(isvc)]),
        ..Default::default()
    }
}

fn owner(isvc: &InferenceService) -> OwnerReference {
    OwnerReference {
        api_version: InferenceService::api_version(&()).into(),
        kind: InferenceService::kind(&()).into(),
        name: isvc.name_any(),
        uid: isvc.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Served model name: the spec's, else the default model's, else the file's stem.
pub fn served_model(isvc: &InferenceService) -> String {
    let m = &isvc.spec.model;
    if let Some(n) = &m.served_name {
        return n.clone();
    }
    let path = m
        .host_path
        .as_ref()
        .map(|h| h.path.as_str())
        .or(m.pvc.as_ref().map(|p| p.path.as_str()));
    match path {
        Some(p) => std::path::Path::new(p)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| isvc.name_any()),
        None => "SmolLM2-135M-Instruct.Q4_1".into(),
    }
}

/// The engine's starting `max_num_seqs`: the spec's, else its ceiling.
fn engine_max_num_seqs(e: &EngineSettings) -> i32 {
    e.max_num_seqs.unwrap_or(e.max_num_seqs_ceiling)
}

fn engine_args(isvc: &InferenceService) -> (Vec<String>, Vec<Volume>, Vec<VolumeMount>) {
    let s = &isvc.spec;
    let e = &s.engine;
    let drain_grace = (s.termination_grace_period_seconds - 5).max(1);
    let mut args = vec![
        format!("--served-model-name={}", served_model(isvc)),
        format!("--port={ENGINE_PORT}"),
        format!("--block-size={}", e.block_size),
        format!("--kv-cache-mib={}", e.kv_cache_mib),
        format!("--kv-cache-dtype={}", e.kv_cache_dtype),
        format!("--max-num-seqs-ceiling={}", e.max_num_seqs_ceiling),
        format!("--max-num-seqs={}", engine_max_num_seqs(e)),
        format!(
            "--max-batched-tokens-ceiling={}",
            e.max_batched_tokens.max(2048)
        ),
        format!("--max-batched-tokens={}", e.max_batched_tokens),
        // The engine must finish draining before the kubelet's SIGKILL.
        format!("--drain-grace-seconds={drain_grace}"),
        format!(
            "--lame-duck-seconds={}",
            s.lame_duck_seconds.clamp(0, drain_grace - 1)
        ),
    ];
    if let Some(t) = e.threads {
        args.push(format!("--threads={t}"));
    }
    // The engines admit first the requests that can still meet it.
    if let Some(ms) = s.ttft_objective_ms() {
        args.push(format!("--ttft-objective-ms={ms}"));
    }
    let (mut volumes, mut mounts) = (Vec::new(), Vec::new());
    let mount = |name: &str| VolumeMount {
        name: name.into(),
        mount_path: MODEL_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    };
    if let Some(h) = &s.model.host_path {
        let p = std::path::Path::new(&h.path);
        let dir = p
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or("/".into());
        let file = p
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        volumes.push(Volume {
            name: "model".into(),
            host_path: Some(HostPathVolumeSource {
                path: dir,
                type_: Some("Directory".into()),
            }),
            ..Default::default()
        });
        mounts.push(mount("model"));
        args.push(format!("--model={MODEL_DIR}/{file}"));
    } else if let Some(v) = &s.model.pvc {
        volumes.push(Volume {
            name: "model".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: v.claim_name.clone(),
                read_only: Some(true),
            }),
            ..Default::default()
        });
        mounts.push(mount("model"));
        args.push(format!("--model={MODEL_DIR}/{}", v.path));
    }
    if let Some(k) = &s.api_key_secret {
        // A volume, not an environment variable: the kubelet updates its file when the Secret
        // changes, and the engine reads it again (key rotation without a restart).
        volumes.push(Volume {
            name: "api-keys".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(k.name.clone()),
                items: Some(vec![KeyToPath {
                    key: k.key.clone(),
                    path: "keys".into(),
                    mode: None,
                }]),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "api-keys".into(),
            mount_path: API_KEYS_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
        args.push(format!("--api-key-file={API_KEYS_DIR}/keys"));
    }
    (args, volumes, mounts)
}

fn http_probe(path: &str, port: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(port.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

fn hardened() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn deployment(isvc: &InferenceService, d: &Defaults) -> Deployment {
    let s = &isvc.spec;
    let (args, mut volumes, mounts) = engine_args(isvc);
    let mut containers = vec![Container {
        name: "engine".into(),
        image: Some(s.image.clone().unwrap_or_else(|| d.engine_image.clone())),
        args: Some(args),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: ENGINE_PORT,
            // Explicit: a 1.20 server's server-side apply needs the list-map key present.
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        // /ready is false while the model loads and while draining; /health is the process.
        readiness_probe: Some(http_probe("/ready", "http", 2, 1)),
        liveness_probe: Some(http_probe("/health", "http", 10, 3)),
        resources: s.resources.clone(),
        security_context: Some(hardened()),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        ..Default::default()
    }];
    if s.sidecar.enabled {
        volumes.push(Volume {
            name: "sidecar-token".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(token_secret_name(isvc)),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        });
        containers.push(Container {
            name: "sidecar".into(),
            image: Some(
                s.sidecar
                    .image
                    .clone()
                    .unwrap_or_else(|| d.sidecar_image.clone()),
            ),
            args: Some(vec![
                format!("--engine-url=http://127.0.0.1:{ENGINE_PORT}"),
                "--engine-admin-url=http://127.0.0.1:8001".into(),
                format!("--device={}", s.sidecar.device),
                format!("--port={SIDECAR_PORT}"),
                format!("--token-file={TOKEN_DIR}/token"),
                // The engine's own limits, the guard's target until the operator sets one.
                format!("--max-num-seqs={}", engine_max_num_seqs(&s.engine)),
                format!("--max-batched-tokens={}", s.engine.max_batched_tokens),
            ]),
            ports: Some(vec![ContainerPort {
                name: Some("pressure".into()),
                container_port: SIDECAR_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            readiness_probe: Some(http_probe("/health", "pressure", 5, 3)),
            liveness_probe: Some(http_probe("/health", "pressure", 10, 3)),
            security_context: Some(hardened()),
            volume_mounts: Some(vec![VolumeMount {
                name: "sidecar-token".into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        });
    }
    Deployment {
        metadata: meta(isvc, isvc.name_any()),
        spec: Some(DeploymentSpec {
            replicas: Some(effective_replicas(s)),
            selector: LabelSelector {
                match_labels: Some(selector(isvc)),
                ..Default::default()
            },
            // New pods load the model before old ones go: never below the serving count.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(isvc)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers,
                    volumes: (!volumes.is_empty()).then_some(volumes),
                    // Engines never call the API server.
                    automount_service_account_token: Some(false),
                    termination_grace_period_seconds: Some(s.termination_grace_period_seconds),
                    node_selector: (!s.node_selector.is_empty()).then(|| s.node_selector.clone()),
                    tolerations: (!s.tolerations.is_empty()).then(|| s.tolerations.clone()),
                    affinity: s.affinity.clone(),
                    priority_class_name: s.priority_class_name.clone(),
                    image_pull_secrets: (!s.image_pull_secrets.is_empty())
                        .then(|| s.image_pull_secrets.clone()),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS),
                        run_as_group: Some(RUN_AS),
                        fs_group: Some(RUN_AS),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Where the Service answers inside the cluster (`status.url`). `<name>.<namespace>.svc`
/// resolves through every pod's DNS search path, whatever the cluster's domain.
pub fn url(isvc: &InferenceService) -> String {
    format!(
        "http://{}.{}.svc:{ENGINE_PORT}",
        isvc.name_any(),
        isvc.namespace().unwrap_or_default()
    )
}

pub fn service(isvc: &InferenceService) -> Service {
    Service {
        metadata: meta(isvc, isvc.name_any()),
        spec: Some(ServiceSpec {
            selector: Some(selector(isvc)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: ENGINE_PORT,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// At most one engine pod of a service disrupted at a time by evictions (a node drain, a
/// cluster autoscaler's scale-down): each pod is a model load and a KV pool, and a drained node
/// must not take the whole service down while new pods load. The operator's own scale-downs
/// delete pods it drained, which no budget governs. `api`: the PodDisruptionBudget as the
/// server serves it (`policy/v1`, or `policy/v1beta1` before 1.21: the body is the same).
pub fn disruption_budget(isvc: &InferenceService, api: &ApiResource) -> DynamicObject {
    let mut pdb = DynamicObject::new(&isvc.name_any(), api);
    pdb.metadata = meta(isvc, isvc.name_any());
    pdb.data = serde_json::json!({"spec": {
        "maxUnavailable": 1,
        "selector": {"matchLabels": selector(isvc)},
    }});
    pdb
}

/// The sidecar token Secret's metadata; the token itself is generated once by the reconciler.
pub fn token_secret_meta(isvc: &InferenceService) -> ObjectMeta {
    meta(isvc, token_secret_name(isvc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn isvc(yaml: &str) -> InferenceService {
        let mut i: InferenceService = serde_yaml::from_str(yaml).unwrap();
        i.metadata.uid = Some("u-1".into());
        i
    }

    const BASE: &str = "apiVersion: redline.dev/v1alpha1\nkind: InferenceService\nmetadata: {name: chat, namespace: ml}\nspec:\n  model: {default: {}}\n";

    #[test]
    fn the_disruption_budget_lets_one_pod_of_the_service_go_at_a_time() {
        let i = isvc(BASE);
        for version in ["v1", "v1beta1"] {
            let api = ApiResource {
                group: "policy".into(),
                version: version.into(),
                api_version: format!("policy/{version}"),
                kind: "PodDisruptionBudget".into(),
                plural: "poddisruptionbudgets".into(),
            };
            let v = serde_json::to_value(disruption_budget(&i, &api)).unwrap();
            assert_eq!(v["apiVersion"], format!("policy/{version}"));
            assert_eq!(v["kind"], "PodDisruptionBudget");
            assert_eq!(
                (&v["metadata"]["name"], &v["metadata"]["namespace"]),
                (&serde_json::json!("chat"), &serde_json::json!("ml"))
            );
            assert_eq!(v["metadata"]["ownerReferences"][0]["uid"], "u-1");
            assert_eq!(v["spec"]["maxUnavailable"], 1);
            // The Deployment's pods, and only the service's.
            let pods = deployment(&i, &Defaults::default())
                .spec
                .unwrap()
                .template
                .metadata
                .unwrap()
                .labels
                .unwrap();
            let select = v["spec"]["selector"]["matchLabels"].as_object().unwrap();
            assert!(!select.is_empty());
            for (k, val) in select {
                assert_eq!(pods.get(k).map(String::as_str), val.as_str(), "{k}");
            }
        }
    }

    fn pod_spec(i: &InferenceService) -> PodSpec {
        deployment(i, &Defaults::default())
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
    }

    #[test]
    fn the_pods_are_scheduled_as_the_spec_says_and_left_to_the_cluster_otherwise() {
        let bare = pod_spec(&isvc(BASE));
        assert_eq!(
            (
                &bare.node_selector,
                &bare.tolerations,
                &bare.affinity,
                &bare.priority_class_name,
                &bare.image_pull_secrets
            ),
            (&None, &None, &None, &None, &None)
        );
        let pod = pod_spec(&isvc(&format!(
            "{BASE}  nodeSelector: {{pool: h100}}\n  tolerations: [{{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}}]\n  affinity: {{podAntiAffinity: {{preferredDuringSchedulingIgnoredDuringExecution: [{{weight: 100, podAffinityTerm: {{topologyKey: topology.kubernetes.io/zone, labelSelector: {{matchLabels: {{app: chat}}}}}}}}]}}}}\n  priorityClassName: inference-high\n  imagePullSecrets: [{{name: registry}}]\n"
        )));
        assert_eq!(
            pod.node_selector.unwrap().get("pool").map(String::as_str),
            Some("h100")
        );
        let t = &pod.tolerations.unwrap()[0];
        assert_eq!(
            (t.key.as_deref(), t.operator.as_deref(), t.effect.as_deref()),
            (Some("nvidia.com/gpu"), Some("Exists"), Some("NoSchedule"))
        );
        let term = &pod
            .affinity
            .unwrap()
            .pod_anti_affinity
            .unwrap()
            .preferred_during_scheduling_ignored_during_execution
            .unwrap()[0];
        assert_eq!(
            (term.weight, term.pod_affinity_term.topology_key.as_str()),
            (100, "topology.kubernetes.io/zone")
        );
        assert_eq!(pod.priority_class_name.as_deref(), Some("inference-high"));
        assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "registry");
    }

    #[test]
    fn api_keys_reach_the_engine_as_a_read_only_file_from_the_secret() {
        let bare = pod_spec(&isvc(BASE));
        assert!(!bare.containers[0]
            .args
            .as_ref()
            .unwrap()
            .iter()
            .any(|a| a.starts_with("--api-key")));
        let pod = pod_spec(&isvc(&format!(
            "{BASE}  apiKeySecret: {{name: chat-keys}}\n"
        )));
        let engine = &pod.containers[0];
        assert!(engine
            .args
            .as_ref()
            .unwrap()
            .contains(&format!("--api-key-file={API_KEYS_DIR}/keys")));
        let mount = engine
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "api-keys")
            .unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            (API_KEYS_DIR, Some(true))
        );
        let vol = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "api-keys")
            .unwrap()
            .secret
            .unwrap();
        assert_eq!(vol.secret_name.as_deref(), Some("chat-keys"));
        // The default entry, as the file the engine reads; no one else mounts it.
        let item = &vol.items.unwrap()[0];
        assert_eq!((item.key.as_str(), item.path.as_str()), ("api-key", "keys"));
        assert!(pod.containers[1..].iter().all(|c| c
            .volume_mounts
            .iter()
            .flatten()
            .all(|m| m.name != "api-keys")));
    }

    #[test]
    fn deployment_is_hardened_owned_and_sized() {
        let i = isvc(&format!("{BASE}  minReplicas: 1\n  maxReplicas: 4\n  replicas: 9\n  resources: {{limits: {{nvidia.com/gpu: '1'}}}}\n"));
        let d = deployment(&i, &Defaults::default());
        assert_eq!(
            d.spec.as_ref().unwrap().replicas,
            Some(4),
            "clamped to maxReplicas"
        );
        let o = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (o.kind.as_str(), o.controller),
            ("InferenceService", Some(true))
        );
        let pod = d.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.containers.len(), 2, "engine + sidecar");
        for c in &pod.containers {
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(sc.read_only_root_filesystem, Some(true));
            assert_eq!(sc.allow_privilege_escalation, Some(false));
            assert_eq!(sc.run_as_non_root, Some(true));
            assert!(c.readiness_probe.is_some() && c.liveness_probe.is_some());
        }
        let engine = &pod.containers[0];
        assert_eq!(
            engine.resources.as_ref().unwrap().limits.as_ref().unwrap()["nvidia.com/gpu"].0,
            "1"
        );
        let args = engine.args.as_ref().unwrap();
        assert!(args.contains(&"--drain-grace-seconds=55".to_string()));
        assert!(args.contains(&"--lame-duck-seconds=5".to_string()));
        // A lame duck longer than the drain's time leaves a second to finish in.
        let short = isvc(&format!(
            "{BASE}  terminationGracePeriodSeconds: 8\n  lameDuckSeconds: 20\n"
        ));
        let short = pod_spec(&short).containers[0].args.clone().unwrap();
        assert!(
            short.contains(&"--drain-grace-seconds=3".to_string())
                && short.contains(&"--lame-duck-seconds=2".to_string()),
            "{short:?}"
        );
        assert!(
            !args.iter().any(|a| a.starts_with("--ttft-objective-ms")),
            "no SLO, arrival order: {args:?}"
        );
        let with_slo = isvc(&format!("{BASE}  slo: {{ttftP99Ms: 1500}}\n"));
        let pod = pod_spec(&with_slo);
        assert!(pod.containers[0]
            .args
            .as_ref()
            .unwrap()
            .contains(&"--ttft-objective-ms=1500".to_string()));
        assert!(
            args.contains(&"--kv-cache-dtype=f16".to_string()),
            "{args:?}"
        );
        // The sidecar knows the engine's own limits: its guard's target before the operator's.
        let sized = isvc(&format!(
            "{BASE}  engine: {{maxNumSeqsCeiling: 48, maxBatchedTokens: 384}}\n"
        ));
        let pod = pod_spec(&sized);
        let (engine, sidecar) = (&pod.containers[0], &pod.containers[1]);
        for c in [engine, sidecar] {
            let args = c.args.as_ref().unwrap();
            assert!(args.contains(&"--max-num-seqs=48".to_string()), "{args:?}");
            assert!(
                args.contains(&"--max-batched-tokens=384".to_string()),
                "{args:?}"
            );
        }
    }

    #[test]
    fn the_url_is_the_services_name_and_port() {
        let i = isvc(BASE);
        assert_eq!(url(&i), "http://chat.ml.svc:8000");
        let port = &service(&i).spec.unwrap().ports.unwrap()[0];
        assert!(url(&i).ends_with(&format!(":{}", port.port)));
    }

    #[test]
    fn model_sources_become_mounts_and_flags() {
        let i = isvc(&BASE.replace("{default: {}}", "{hostPath: {path: /data/models/m.gguf}}"));
        let pod = pod_spec(&i);
        let v = &pod.volumes.as_ref().unwrap()[0];
        assert_eq!(v.host_path.as_ref().unwrap().path, "/data/models");
        assert!(pod.containers[0]
            .args
            .as_ref()
            .unwrap()
            .contains(&format!("--model={MODEL_DIR}/m.gguf")));
        assert_eq!(served_model(&i), "m");
        let no_sidecar = isvc(&format!("{BASE}  sidecar: {{enabled: false}}\n"));
        let pod = pod_spec(&no_sidecar);
        assert_eq!(pod.containers.len(), 1);
        assert!(
            pod.volumes.is_none(),
            "no model volume for the default model, no token volume"
        );
    }
}
