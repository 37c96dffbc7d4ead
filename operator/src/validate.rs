//! Checks the schema cannot express on a 1.20 API server (no CEL): reported by the reconciler as
//! a `Degraded` condition with reason `InvalidSpec`, and nothing is changed for that service.

use crate::crd::InferenceServiceSpec;

/// Every problem with the spec, in words a user can act on; empty when valid.
pub fn problems(spec: &InferenceServiceSpec) -> Vec<String> {
    let mut p = Vec::new();
    if spec.min_replicas > spec.max_replicas {
        p.push(format!(
            "minReplicas ({}) is greater than maxReplicas ({})",
            spec.min_replicas, spec.max_replicas
        ));
    }
    for (field, v) in [
        ("minReplicas", spec.min_replicas),
        ("maxReplicas", spec.max_replicas),
        ("replicas", spec.replicas.unwrap_or(0)),
        ("engine.blockSize", spec.engine.block_size),
        ("engine.kvCacheMib", spec.engine.kv_cache_mib),
        ("engine.maxNumSeqsCeiling", spec.engine.max_num_seqs_ceiling),
        ("engine.maxBatchedTokens", spec.engine.max_batched_tokens),
    ] {
        if v < 0 {
            p.push(format!("{field} must not be negative (got {v})"));
        }
    }
    if spec.engine.block_size == 0
        || spec.engine.kv_cache_mib == 0
        || spec.engine.max_batched_tokens == 0
    {
        p.push(
            "engine.blockSize, engine.kvCacheMib and engine.maxBatchedTokens must be at least 1"
                .into(),
        );
    }
    if let Some(s) = spec.engine.max_num_seqs {
        if s < 0 || s > spec.engine.max_num_seqs_ceiling {
            p.push(format!(
                "engine.maxNumSeqs ({s}) must be within 0..=engine.maxNumSeqsCeiling ({})",
                spec.engine.max_num_seqs_ceiling
            ));
        }
    }
    let m = &spec.model;
    let sources = [m.default.is_some(), m.host_path.is_some(), m.pvc.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    match sources {
        0 => p.push("model: give one source (default, hostPath or pvc)".into()),
        1 => {}
        _ => p.push("model: give only one source (default, hostPath or pvc)".into()),
    }
    if let Some(h) = &m.host_path {
        if !h.path.starts_with('/') || !h.path.ends_with(".gguf") {
            p.push(format!(
                "model.hostPath.path {:?} must be an absolute path to a .gguf file",
                h.path
            ));
        }
    }
    if let Some(v) = &m.pvc {
        if v.path.starts_with('/')
            || v.path.split('/').any(|c| c == "..")
            || !v.path.ends_with(".gguf")
        {
            p.push(format!(
                "model.pvc.path {:?} must be a relative path to a .gguf file inside the volume",
                v.path
            ));
        }
    }
    if let Some(a) = &spec.autoscaling {
        if a.policy_ref.is_some() && a.policy.is_some() {
            p.push("autoscaling: give policyRef or policy, not both".into());
        }
    }
    p
}

/// The replicas the Deployment should have: the requested count clamped into [min, max].
pub fn effective_replicas(spec: &InferenceServiceSpec) -> i32 {
    let (lo, hi) = (spec.min_replicas.max(0), spec.max_replicas.max(0));
    spec.replicas.unwrap_or(lo).clamp(lo.min(hi), hi.max(lo))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(yaml: &str) -> InferenceServiceSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults_are_valid() {
        assert!(problems(&spec("model: {default: {}}")).is_empty());
    }

    #[test]
    fn each_problem_is_named() {
        let cases = [
            (
                "model: {default: {}}\nminReplicas: 3\nmaxReplicas: 1",
                "greater than maxReplicas",
            ),
            (
                "model: {default: {}}\nmaxReplicas: -1",
                "maxReplicas must not be negative",
            ),
            ("model: {}", "give one source"),
            (
                "model: {default: {}, hostPath: {path: /m.gguf}}",
                "only one source",
            ),
            ("model: {hostPath: {path: m.gguf}}", "absolute path"),
            (
                "model: {pvc: {claimName: c, path: ../x.gguf}}",
                "relative path",
            ),
            (
                "model: {default: {}}\nengine: {maxNumSeqsCeiling: 4, maxNumSeqs: 9}",
                "engine.maxNumSeqs",
            ),
            (
                "model: {default: {}}\nautoscaling: {policyRef: p, policy: {}}",
                "not both",
            ),
        ];
        for (y, want) in cases {
            let p = problems(&spec(y));
            assert!(p.iter().any(|m| m.contains(want)), "{y}: {p:?}");
        }
    }

    proptest! {
        #[test]
        fn effective_replicas_within_bounds(min in 0i32..10, max in 0i32..10, r in proptest::option::of(-5i32..20)) {
            let mut s = spec("model: {default: {}}");
            (s.min_replicas, s.max_replicas, s.replicas) = (min, max, r);
            let e = effective_replicas(&s);
            if min <= max {
                prop_assert!(e >= min && e <= max);
                if let Some(r) = r { if r >= min && r <= max { prop_assert_eq!(e, r); } }
            }
        }
    }
}
