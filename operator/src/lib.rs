//! redline's operator: reconciles `InferenceService` custom resources into GPU Deployments
//! (engine + pressure sidecar), with status, Events, the scale subresource and leader election,
//! and scales them from their sidecars' pressure (`autoscaler`).

pub mod autoscaler;
pub mod children;
pub mod client;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod engine_pods;
pub mod leader;
pub mod log_once;
pub mod loop_status;
pub mod memory;
pub mod metrics;
pub mod scaling_active;
pub mod sidecars;
#[cfg(test)]
mod test_support;
pub mod validate;
pub mod watch;

/// The CRDs as YAML documents, in the order `redline-operator crd` prints them.
pub fn crd_yaml() -> Vec<(&'static str, String)> {
    use kube::CustomResourceExt;
    vec![
        (
            "inferenceservices.redline.dev.yaml",
            serde_yaml::to_string(&crd::InferenceService::crd()).expect("CRD serializes"),
        ),
        (
            "autoscalingpolicies.redline.dev.yaml",
            serde_yaml::to_string(&crd::AutoscalingPolicy::crd()).expect("CRD serializes"),
        ),
    ]
}
