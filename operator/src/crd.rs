//! The API: `InferenceService` and `AutoscalingPolicy` in `redline.dev/v1alpha1`, generated
//! into CRDs by `redline-operator crd` (checked in under crds/, tested for drift).
//!
//! Only schema features a 1.20 API server understands: structural schemas, ranges, enums,
//! defaults; no CEL rules. Cross-field checks (`minReplicas <= maxReplicas`, exactly one model
//! source) are the reconciler's, reported as a `Degraded` condition (see validate.rs).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use redline_autoscale::defaults;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "redline.dev";

/// A model served by a set of engine pods that redline scales before they redline.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "redline.dev",
    version = "v1alpha1",
    kind = "InferenceService",
    namespaced,
    status = "InferenceServiceStatus",
    shortname = "infsvc",
    shortname = "rlis",
    category = "redline",
    scale = r#"{"specReplicasPath":".spec.replicas","statusReplicasPath":".status.replicas","labelSelectorPath":".status.selector"}"#,
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".status.servedModel"}"#,
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".status.url","priority":1}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"KV","type":"string","jsonPath":".status.kvUsage"}"#,
    printcolumn = r#"{"name":"Late","type":"string","jsonPath":".status.lateRequests"}"#,
    printcolumn = r#"{"name":"Decision","type":"string","jsonPath":".status.lastDecision.summary"}"#,
    printcolumn = r#"{"name":"Scaling","type":"string","jsonPath":".status.conditions[?(@.type==\"ScalingActive\")].reason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct InferenceServiceSpec {
    pub model: ModelSource,
    #[serde(default)]
    pub engine: EngineSettings,
    /// Desired replicas. Written by `kubectl scale`, HPA/KEDA (scale subresource) or, when
    /// autoscaling is enabled, by the operator itself. Kept within [minReplicas, maxReplicas].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    /// The fewest replicas. 0 lets `kubectl scale` (or an HPA) stop the service; redline's
    /// autoscaling keeps at least 1 while maxReplicas allows one, since with no pod there is
    /// no demand to see (no scale from zero).
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub min_replicas: i32,
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub max_replicas: i32,
    /// Resources of the engine container; `nvidia.com/gpu` is whole devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<Slo>,
    #[serde(default)]
    pub sidecar: SidecarSettings,
    /// Engine image (default: the operator's own release of ghcr.io/redline/engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Seconds a pod has to finish its requests after SIGTERM (engine drain).
    #[serde(default = "grace")]
    #[schemars(range(min = 1, max = 3600))]
    pub termination_grace_period_seconds: i64,
    /// Seconds a draining pod (a scale-down, a rolling update, an eviction) goes on admitting
    /// new requests after it turns not ready: the Service's endpoints, every node's proxy and
    /// any load balancer take that long to stop sending, and a request the engine refused
    /// then would fail at a client that does not retry. Raise it behind a load balancer that
    /// deregisters slowly. Capped one second under the drain's share of
    /// `terminationGracePeriodSeconds`.
    #[serde(default = "lame_duck")]
    #[schemars(range(min = 0, max = 600))]
    pub lame_duck_seconds: i64,
    /// Node labels the engine pods must run on (a pod spec's `nodeSelector`), e.g. a GPU pool's
    /// `cloud.google.com/gke-accelerator: nvidia-h100-80gb`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the engine pods tolerate (a pod spec's `tolerations`): GPU node pools are usually
    /// tainted, e.g. `nvidia.com/gpu:NoSchedule`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// The engine pods' node and pod affinity (a pod spec's `affinity`), e.g. replicas spread
    /// over zones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// The engine pods' PriorityClass (a pod spec's `priorityClassName`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Secrets for pulling the engine and sidecar images from a private registry (a pod spec's
    /// `imagePullSecrets`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// API keys the OpenAI API requires (`Authorization: Bearer <key>`), as vLLM's
    /// `--api-key`: a Secret in the service's namespace whose entry holds one key per line.
    /// Mounted as a volume, so a changed Secret rotates the keys in the running engines
    /// (within the kubelet's sync, about a minute) without a restart. Health, readiness and
    /// metrics stay open. Unset: the API is open to whoever reaches the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<ApiKeySecret>,
}

/// The Secret entry with the engines' API keys.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeySecret {
    /// The Secret's name, in the service's namespace.
    #[schemars(length(min = 1))]
    pub name: String,
    /// The entry holding the keys, one per line.
    #[serde(default = "api_key_entry")]
    #[schemars(length(min = 1))]
    pub key: String,
}

fn api_key_entry() -> String {
    "api-key".into()
}

impl InferenceServiceSpec {
    /// The TTFT objective the engines admit by (`--ttft-objective-ms`), from `slo.ttftP99Ms`.
    pub fn ttft_objective_ms(&self) -> Option<i32> {
        self.slo.as_ref().and_then(|slo| slo.ttft_p99_ms)
    }
}

fn one() -> i32 {
    1
}
fn grace() -> i64 {
    60
}

/// The readiness probe's 2 s period, the endpoint change reaching every node's proxy, and a
/// margin.
fn lame_duck() -> i64 {
    5
}

/// Where the GGUF file comes from. Exactly one of `default`, `hostPath`, `pvc`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// Name the model is served under (`model` in OpenAI requests); default: the file's stem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_name: Option<String>,
    /// The project's default model (SmolLM2-135M-Instruct Q4_1), carried by the engine image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<DefaultModel>,
    /// A GGUF file on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathModel>,
    /// A GGUF file in a PersistentVolumeClaim, mounted read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcModel>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, Default)]
pub struct DefaultModel {}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostPathModel {
    /// Absolute path of the .gguf file on the node.
    #[schemars(length(min = 1))]
    pub path: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcModel {
    #[schemars(length(min = 1))]
    pub claim_name: String,
    /// Path of the .gguf file inside the volume.
    #[schemars(length(min = 1))]
    pub path: String,
}

/// Engine capacity envelope (fixed per pod at start) and initial live limits.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EngineSettings {
    /// Tokens per KV block.
    #[serde(default = "block_size")]
    #[schemars(range(min = 1, max = 256))]
    pub block_size: i32,
    /// KV pool size in MiB.
    #[serde(default = "kv_cache_mib")]
    #[schemars(range(min = 1))]
    pub kv_cache_mib: i32,
    /// What the KV pool stores: f16 (twice the tokens per MiB) or f32 (exact values).
    #[serde(default = "kv_cache_dtype")]
    #[schemars(regex(pattern = "^(f16|f32)$"))]
    pub kv_cache_dtype: String,
    /// Ceiling of max_num_seqs: the most the operator or sidecar may ever set.
    #[serde(default = "seqs_ceiling")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_num_seqs_ceiling: i32,
    /// Initial max_num_seqs (default: the ceiling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_num_seqs: Option<i32>,
    /// Token budget per engine step.
    #[serde(default = "batched_tokens")]
    #[schemars(range(min = 1))]
    pub max_batched_tokens: i32,
    /// Compute threads per engine (default: the CPUs the pod may use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub threads: Option<i32>,
}

fn block_size() -> i32 {
    16
}
fn kv_cache_mib() -> i32 {
    256
}
fn kv_cache_dtype() -> String {
    "f16".into()
}
fn seqs_ceiling() -> i32 {
    64
}
fn batched_tokens() -> i32 {
    256
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            block_size: block_size(),
            kv_cache_mib: kv_cache_mib(),
            kv_cache_dtype: kv_cache_dtype(),
            max_num_seqs_ceiling: seqs_ceiling(),
            max_num_seqs: None,
            max_batched_tokens: batched_tokens(),
            threads: None,
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// When true the operator owns `spec.replicas`; leave false to drive the scale
    /// subresource from HPA/KEDA or `kubectl scale`.
    #[serde(default)]
    pub enabled: bool,
    /// An AutoscalingPolicy in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_ref: Option<String>,
    /// An inline policy (used when no policyRef is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<AutoscalingPolicySpec>,
}

/// Latency objectives the autoscaler keeps.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Slo {
    /// Time to first token, p99, milliseconds. The engines admit first the requests that can
    /// still meet it, and the ones that cannot behind them (`--ttft-objective-ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub ttft_p99_ms: Option<i32>,
    /// Inter-token latency, p99, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub itl_p99_ms: Option<i32>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSettings {
    /// Run the pressure sidecar next to each engine (the fast guard and the operator's
    /// pressure source).
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Device backend: auto, nvml or cgroup.
    #[serde(default = "device_auto")]
    #[schemars(regex(pattern = "^(auto|nvml|cgroup)$"))]
    pub device: String,
}

fn yes() -> bool {
    true
}
fn device_auto() -> String {
    "auto".into()
}

impl Default for SidecarSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            image: None,
            device: device_auto(),
        }
    }
}

/// How an InferenceService scales; reusable across services. The policy is redline's
/// (`autoscale/`, the same code `redline-sim` runs; docs/autoscaling.md).
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "redline.dev",
    version = "v1alpha1",
    kind = "AutoscalingPolicy",
    namespaced,
    shortname = "rlpolicy",
    category = "redline"
)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingPolicySpec {
    /// Share of a replica's capacity (`replicaCapacity`) the policy plans to use; the rest
    /// absorbs bursts while new replicas start. Default: 1.0 for a service with a TTFT
    /// objective (`spec.slo.ttftP99Ms`): its engines admit deadline-first and count their late
    /// requests, and the policy adds a margin only while the SLO's error budget burns. 0.6
    /// without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.05, max = 1.0))]
    pub target_utilization: Option<f64>,
    /// KV-cache usage (0..1) the pods are steered towards. Default: 0.7 when
    /// `replicaCapacity.stepSeconds` is given (the policy then knows how the pools shrink as
    /// replicas are added), 0.5 without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.05, max = 0.99))]
    pub target_kv_usage: Option<f64>,
    /// What one replica sustains within the SLO (measure with `redline-engine bench`; the
    /// default is the default model on 2 CPU cores).
    #[serde(default)]
    pub replica_capacity: ReplicaCapacity,
    /// How far ahead demand is forecast, seconds: at least a new pod's time to Ready.
    #[serde(default = "horizon")]
    #[schemars(range(min = 1, max = 600))]
    pub forecast_horizon_seconds: i32,
    /// Window the demand trend is fitted over, seconds (0: no trend).
    #[serde(default = "trend_window")]
    #[schemars(range(min = 0, max = 600))]
    pub trend_window_seconds: i32,
    /// The trend is fitted to the demand averaged again over this window, seconds (0: to the
    /// demand itself): a burst's first seconds are steep, and are not a ramp.
    #[serde(default = "trend_smoothing")]
    #[schemars(range(min = 0, max = 600))]
    pub trend_smoothing_seconds: i32,
    /// Demand is averaged over this window, seconds: bursts shorter wait in the queue.
    #[serde(default = "smoothing")]
    #[schemars(range(min = 1, max = 600))]
    pub demand_smoothing_seconds: i32,
    /// No scale-up sooner than this after the last scaling action, seconds.
    #[serde(default = "up_cooldown")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_up_cooldown_seconds: i32,
    /// Demand must fit on fewer replicas for this long before pods are drained, seconds; also
    /// the least time from a scale-up to the next scale-down.
    #[serde(default = "down_window")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_window_seconds: i32,
    /// Most replicas added, or drained, in one decision.
    #[serde(default = "max_step")]
    #[schemars(range(min = 1, max = 100))]
    pub max_step: i32,
    /// A drained pod is removed after this long even if not empty (its own SIGTERM drain
    /// finishes it), seconds.
    #[serde(default = "drain_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub drain_timeout_seconds: i32,
    /// Sidecar guard: KV usage treated as the redline (0..1).
    #[serde(default = "guard_kv")]
    #[schemars(range(min = 0.1, max = 1.0))]
    pub guard_kv_usage: f64,
}

/// Tokens per second one replica sustains.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaCapacity {
    #[serde(default = "cap_prompt")]
    #[schemars(range(min = 0.001))]
    pub prompt_tokens_per_second: f64,
    #[serde(default = "cap_generation")]
    #[schemars(range(min = 0.001))]
    pub generation_tokens_per_second: f64,
    /// Seconds of one engine step with a single sequence decoding (the bench's one-stream
    /// inter-token latency): the fixed cost every step pays. With it the policy reads each
    /// pod's load from the time its engine spends stepping, and sizes the KV pools as queues
    /// (docs/autoscaling.md, "The load share"); engines that do not export their step
    /// durations (vLLM) are sized as without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0001, max = 10.0))]
    pub step_seconds: Option<f64>,
}

impl Default for ReplicaCapacity {
    fn default() -> Self {
        Self {
            prompt_tokens_per_second: cap_prompt(),
            generation_tokens_per_second: cap_generation(),
            step_seconds: None,
        }
    }
}

fn cap_prompt() -> f64 {
    230.0
}
fn cap_generation() -> f64 {
    200.0
}
fn horizon() -> i32 {
    defaults::FORECAST_HORIZON_SECONDS as i32
}
fn trend_window() -> i32 {
    defaults::TREND_WINDOW_SECONDS as i32
}
fn trend_smoothing() -> i32 {
    defaults::TREND_SMOOTHING_SECONDS as i32
}
fn smoothing() -> i32 {
    defaults::DEMAND_SMOOTHING_SECONDS as i32
}
fn up_cooldown() -> i32 {
    defaults::SCALE_UP_COOLDOWN_SECONDS as i32
}
fn down_window() -> i32 {
    defaults::SCALE_DOWN_WINDOW_SECONDS as i32
}
fn max_step() -> i32 {
    defaults::MAX_STEP as i32
}
fn drain_timeout() -> i32 {
    defaults::DRAIN_TIMEOUT_SECONDS as i32
}
fn guard_kv() -> f64 {
    0.9
}

impl Default for AutoscalingPolicySpec {
    fn default() -> Self {
        Self {
            target_utilization: None,
            target_kv_usage: None,
            replica_capacity: ReplicaCapacity::default(),
            forecast_horizon_seconds: horizon(),
            trend_window_seconds: trend_window(),
            trend_smoothing_seconds: trend_smoothing(),
            demand_smoothing_seconds: smoothing(),
            scale_up_cooldown_seconds: up_cooldown(),
            scale_down_window_seconds: down_window(),
            max_step: max_step(),
            drain_timeout_seconds: drain_timeout(),
            guard_kv_usage: guard_kv(),
        }
    }
}

/// Observed state, written by the operator (server-side apply on the status subresource).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferenceServiceStatus {
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the pods, for the scale subresource (HPA/KEDA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded, NearRedline and ResourcesAvailable (False, reason
    /// Unschedulable, while a pod waits for a node), in Kubernetes' condition format. A map
    /// keyed by type for server-side apply: the reconciler owns the first three, the
    /// autoscaling loop the last two.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_model: Option<String>,
    /// The OpenAI-compatible API from inside the cluster, through the service's Service
    /// (`http://<name>.<namespace>.svc:8000`; `/v1/chat/completions` and the rest under it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Mean KV-cache usage across ready pods, as a percentage string for `kubectl get`
    /// (written by the autoscaling loop, like podLimits and lastDecision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_usage: Option<String>,
    /// Requests served after `slo.ttftP99Ms`, per second, summed over the pods as their
    /// engines count them (e.g. "0.4/s"); absent without an objective.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_requests: Option<String>,
    /// Live limits per pod, as its sidecar's guard holds them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_limits: Vec<PodLimits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<Decision>,
    /// What the autoscaling policy remembers between decisions, so that a new leader (a
    /// failover, a rolling update of the operator) goes on where the last one stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaler_memory: Option<AutoscalerMemory>,
}

/// The autoscaling policy's memory (`redline_autoscale::PolicyMemory`) with times in RFC 3339,
/// whole seconds. Absent while redline's autoscaling is off.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalerMemory {
    // No `skip_serializing_if` on the times: in a merge patch, a time that is gone must be
    // sent as null to be removed.
    #[serde(default)]
    pub last_scale_up_time: Option<String>,
    #[serde(default)]
    pub last_scale_down_time: Option<String>,
    /// The last scale-down that reversed a scale-up: the next such one waits four windows.
    #[serde(default)]
    pub last_reversing_scale_down_time: Option<String>,
    /// The last decision that saw a pod still starting: the scale-down window runs from it.
    #[serde(default)]
    pub last_pod_starting_time: Option<String>,
    /// The scale-down window in force: the policy's, doubled after scale-downs that bursts
    /// undid.
    pub scale_down_window_seconds: i64,
    /// Pods being drained for a scale-down, and since when.
    #[serde(default)]
    pub draining: Vec<DrainingPod>,
    /// The SLO's error budget over the last hour, in 5-minute spans, oldest first.
    #[serde(default)]
    pub error_budget: Vec<BudgetSpan>,
    #[serde(default)]
    pub last_late_time: Option<String>,
    /// When the budget's one catch-up (a minute of margin at the first late requests of a
    /// clean hour) began; absent while it is armed.
    #[serde(default)]
    pub catch_up_time: Option<String>,
    /// The policy's recent demand, handed over by a leader that stopped (a rolling update of
    /// the operator, a drained node) so that its successor decides as it would have. Written
    /// once, as it stops; gone at the successor's first write.
    #[serde(default)]
    pub demand_history: Option<DemandHistory>,
}

/// The demand samples of a stopped leader's policy (`redline_autoscale::SampleMemory`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DemandHistory {
    /// The instant the samples' ages count back from.
    pub taken_at: String,
    /// Oldest first.
    pub samples: Vec<DemandSample>,
}

/// One decision's demand: loads in millionths of a replica and ages in milliseconds (integers,
/// as Kubernetes APIs keep floats out of their objects).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DemandSample {
    pub age_ms: i64,
    /// The load in replicas: as measured, averaged over the demand's smoothing window, and
    /// averaged again over the trend's.
    pub demand: Vec<i64>,
    /// The KV term's fill, averaged the same two ways.
    pub kv: Vec<i64>,
    /// The burst reserve in replicas, and the replicas asked for then.
    pub reserve: i64,
    pub desired: i64,
    /// The guarded forecast, and lean sizing's.
    pub guarded: i64,
    pub lean: i64,
    /// Every pod that should have reported did, with fresh data.
    pub complete: bool,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainingPod {
    pub pod: String,
    pub since: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BudgetSpan {
    /// The newest count in the span.
    pub until: String,
    /// Requests whose first token came after the objective.
    pub late: i64,
    pub first_tokens: i64,
}

/// `status.lateRequests` from a rate: a string, as Kubernetes APIs avoid floats, rounded so the
/// status changes only when the rate does.
pub fn late_requests_text(per_second: f64) -> String {
    format!("{per_second:.1}/s")
}

/// The rate back from `status.lateRequests`.
pub fn late_requests_per_second(text: &str) -> Option<f64> {
    text.strip_suffix("/s")?.parse().ok()
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodLimits {
    pub pod: String,
    pub max_num_seqs: i32,
    pub max_batched_tokens: i32,
    /// The pod is draining for a scale-down.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// e.g. "scale 2->3", "drain smollm2-x", "hold 2".
    pub summary: String,
    pub reason: String,
    /// RFC 3339.
    pub time: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_late_rate_reads_back_as_written() {
        for r in [0.0, 0.4, 12.0] {
            assert_eq!(late_requests_per_second(&late_requests_text(r)), Some(r));
        }
        assert_eq!(late_requests_text(0.04), "0.0/s");
        assert_eq!(late_requests_per_second("0.4"), None);
        assert_eq!(late_requests_per_second("fast/s"), None);
    }
}
