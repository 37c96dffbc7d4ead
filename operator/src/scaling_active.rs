//! Whether redline's autoscaling sets a service's replicas: the `ScalingActive` condition.
//! Not when `autoscaling.enabled` is false, and it holds them (status says why) in two cases:
//!
//! - the spec is invalid (`Degraded`, `InvalidSpec`): the reconciler applies nothing until it
//!   is fixed, so a scaling decision would be written and never carried out;
//! - another autoscaler targets the service. A HorizontalPodAutoscaler (or a KEDA
//!   ScaledObject, which makes one) writes `spec.replicas` through the same scale subresource
//!   redline's loop writes: two writers, and the replicas flap between their answers.
//!   Kubernetes' own HPA refuses to act when two of them select the same pods (`ScalingActive`
//!   False, `AmbiguousSelector`); redline does the same while such an HPA exists, with a
//!   Warning Event. Its sidecars' guards and limits go on either way;
//! - the AutoscalingPolicy its `policyRef` names does not exist (`Degraded`, `PolicyNotFound`):
//!   there is nothing to scale by.
//!
//! While it holds, the policy's memory stays in status (`crate::memory::paused`), so
//! autoscaling goes on from it when the cause is gone.

use std::collections::HashMap;

use k8s_openapi::api::autoscaling::v1::HorizontalPodAutoscaler;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

use crate::conditions::{self, Cond, DEGRADED, INVALID_SPEC, SCALING_ACTIVE};
use crate::crd::InferenceService;
use crate::validate;
use crate::watch::{self, Cache};

/// The reason of `ScalingActive` False while an HPA targets the service (and of its Event).
pub const CONFLICTING_AUTOSCALER: &str = "ConflictingAutoscaler";

/// `ScalingActive` once the loop has read the service's AutoscalingPolicy (`found`): held
/// while the one its `policyRef` names is missing (the reconciler says so in `Degraded`).
pub fn with_policy(c: Cond<'static>, isvc: &InferenceService, found: bool) -> Cond<'static> {
    let policy_ref = isvc.spec.autoscaling.as_ref();
    match policy_ref.and_then(|a| a.policy_ref.as_deref()) {
        Some(r) if c.ok == Some(true) && !found => Cond {
            type_: SCALING_ACTIVE,
            ok: Some(false),
            reason: "PolicyNotFound",
            message: format!(
                "AutoscalingPolicy {r:?} not found: redline holds the replicas until it exists"
            ),
        },
        _ => c,
    }
}

/// The HPAs that scale an InferenceService, by the service's key (`namespace/name`).
pub fn targets<'a>(
    hpas: impl IntoIterator<Item = &'a HorizontalPodAutoscaler>,
) -> HashMap<String, Vec<String>> {
    let mut by: HashMap<String, Vec<String>> = HashMap::new();
    for h in hpas {
        let Some(r) = h.spec.as_ref().map(|s| &s.scale_target_ref) else {
            continue;
        };
        // `apiVersion` is optional in a v1 reference; a kind of another group is not ours.
        let group = r.api_version.as_deref().map(|v| v.split('/').next());
        if r.kind != "InferenceService" || group.is_some_and(|g| g != Some("redline.dev")) {
            continue;
        }
        by.entry(format!("{}/{}", h.namespace().unwrap_or_default(), r.name))
            .or_default()
            .push(h.name_any());
    }
    by
}

/// Every HPA `api` lists (the watched namespaces; autoscaling/v1: served by every release from
/// 1.20 on), kept by a watch ([`crate::watch`]).
pub fn cache(
    api: Api<HorizontalPodAutoscaler>,
) -> (
    Cache<HorizontalPodAutoscaler>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    watch::cache(
        api,
        watcher::Config::default(),
        "HorizontalPodAutoscalers",
        "conflicts not checked",
    )
}

/// The HPAs that target InferenceServices, by service key, as the watch last saw them;
/// `None` until its first list is in (the loop then goes on without the check).
pub fn from_cache(hpas: &Cache<HorizontalPodAutoscaler>) -> Option<HashMap<String, Vec<String>>> {
    Some(targets(hpas.last_seen()?.iter().map(|h| h.as_ref())))
}

/// Whether the spec is invalid: by the operator's own checks, or as the reconciler last found
/// it for this generation (the API server refused its Deployment).
fn invalid(isvc: &InferenceService) -> bool {
    let reported = isvc
        .status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, DEGRADED))
        .is_some_and(|c| {
            c.status == "True"
                && c.reason == INVALID_SPEC
                && c.observed_generation == isvc.metadata.generation
        });
    reported || !validate::problems(&isvc.spec).is_empty()
}

/// The `ScalingActive` condition of a service: whether redline's autoscaling sets its replicas.
pub fn condition(isvc: &InferenceService, hpas: Option<&[String]>) -> Cond<'static> {
    let enabled = isvc.spec.autoscaling.as_ref().is_some_and(|a| a.enabled);
    match (enabled, hpas) {
        (true, _) if invalid(isvc) => Cond {
            type_: SCALING_ACTIVE,
            ok: Some(false),
            reason: INVALID_SPEC,
            message: "the spec is invalid (see Degraded): redline holds the replicas until it \
                      is fixed"
                .into(),
        },
        (false, _) => Cond {
            type_: SCALING_ACTIVE,
            ok: Some(false),
            reason: "AutoscalingDisabled",
            message: "autoscaling.enabled is false: replicas follow spec.replicas \
                      (kubectl scale, an HPA)"
                .into(),
        },
        (true, Some(names)) if !names.is_empty() => Cond {
            type_: SCALING_ACTIVE,
            ok: Some(false),
            reason: CONFLICTING_AUTOSCALER,
            message: format!(
                "HorizontalPodAutoscaler {} also scales this service; redline holds its \
                 replicas until that is deleted or autoscaling.enabled is false",
                names.join(", ")
            ),
        },
        (true, _) => Cond {
            type_: SCALING_ACTIVE,
            ok: Some(true),
            reason: "Autoscaling",
            message: "redline's autoscaling sets the replicas".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hpa(
        ns: &str,
        name: &str,
        api_version: Option<&str>,
        kind: &str,
        target: &str,
    ) -> HorizontalPodAutoscaler {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "maxReplicas": 4,
                "scaleTargetRef": {"apiVersion": api_version, "kind": kind, "name": target}
            }
        }))
        .unwrap()
    }

    #[test]
    fn only_hpas_that_scale_an_inference_service_count_by_its_namespace_and_name() {
        let t = targets(&[
            hpa(
                "ml",
                "chat-hpa",
                Some("redline.dev/v1alpha1"),
                "InferenceService",
                "chat",
            ),
            hpa("ml", "keda-hpa-chat", None, "InferenceService", "chat"),
            hpa("ml", "web", Some("apps/v1"), "Deployment", "chat"),
            hpa(
                "ml",
                "other-group",
                Some("serving.kserve.io/v1beta1"),
                "InferenceService",
                "chat",
            ),
            hpa(
                "dev",
                "chat-hpa",
                Some("redline.dev/v1alpha1"),
                "InferenceService",
                "chat",
            ),
        ]);
        assert_eq!(t.len(), 2, "{t:?}");
        assert_eq!(t["ml/chat"], vec!["chat-hpa", "keda-hpa-chat"]);
        assert_eq!(t["dev/chat"], vec!["chat-hpa"]);
    }

    #[test]
    fn the_condition_says_who_sets_the_replicas() {
        let isvc = |enabled: bool| -> InferenceService {
            serde_yaml::from_str(&format!(
                "apiVersion: redline.dev/v1alpha1\nkind: InferenceService\nmetadata: {{name: chat}}\nspec:\n  model: {{default: {{}}}}\n  autoscaling: {{enabled: {enabled}}}\n"
            ))
            .unwrap()
        };
        let names = vec!["chat-hpa".to_string()];
        let c = condition(&isvc(true), Some(&names));
        assert_eq!((c.ok, c.reason), (Some(false), "ConflictingAutoscaler"));
        assert!(c.message.contains("chat-hpa"), "{}", c.message);
        let c = condition(&isvc(true), None);
        assert_eq!((c.ok, c.reason), (Some(true), "Autoscaling"));
        // An invalid spec (min > max here) holds it whatever else is so.
        let mut bad = isvc(true);
        bad.spec.min_replicas = 3;
        bad.spec.max_replicas = 1;
        let c = condition(&bad, Some(&names));
        assert_eq!((c.ok, c.reason), (Some(false), "InvalidSpec"));
        // So does one the API server refused, as the reconciler reported it for this
        // generation; a report of an earlier generation does not count.
        let mut refused = isvc(true);
        refused.metadata.generation = Some(2);
        let degraded = |generation: i64| {
            serde_json::from_value(serde_json::json!({"conditions": [{
                "type": "Degraded", "status": "True", "reason": "InvalidSpec",
                "message": "the API server rejected the Deployment: ...",
                "lastTransitionTime": "2026-11-29T00:00:00Z", "observedGeneration": generation
            }]}))
            .unwrap()
        };
        refused.status = Some(degraded(2));
        assert_eq!(condition(&refused, None).reason, "InvalidSpec");
        refused.status = Some(degraded(1));
        assert_eq!(condition(&refused, None).reason, "Autoscaling");
        // Without redline's autoscaling an HPA is how replicas are meant to be set.
        let c = condition(&isvc(false), Some(&names));
        assert_eq!((c.ok, c.reason), (Some(false), "AutoscalingDisabled"));
        // A policyRef to an AutoscalingPolicy that does not exist holds it too; the inline
        // policy always exists, and a cause found first is the one told.
        let mut by_ref = isvc(true);
        by_ref.spec.autoscaling.as_mut().unwrap().policy_ref = Some("shared".into());
        let c = with_policy(condition(&by_ref, None), &by_ref, false);
        assert_eq!((c.ok, c.reason), (Some(false), "PolicyNotFound"));
        assert!(c.message.contains("\"shared\""), "{}", c.message);
        let c = with_policy(condition(&by_ref, None), &by_ref, true);
        assert_eq!(c.reason, "Autoscaling");
        let c = with_policy(condition(&by_ref, Some(&names)), &by_ref, false);
        assert_eq!(c.reason, "ConflictingAutoscaler");
        let c = with_policy(condition(&isvc(true), None), &isvc(true), false);
        assert_eq!(c.reason, "Autoscaling");
    }
}
