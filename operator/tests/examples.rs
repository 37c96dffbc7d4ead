//! Every manifest under examples/ is what the CRDs accept and what the operator would act on:
//! each document parses into its Rust type with no field dropped (a 1.20 API server prunes
//! unknown fields silently, so a typo would be lost without a word), passes the checks the
//! reconciler reports as `InvalidSpec`, keeps within the ranges, enums and types of the CRD's
//! own schema (what the API server checks at `kubectl apply`), names only policies the
//! examples define, and turns into a sane policy configuration.

use std::path::PathBuf;

use redline_operator::autoscaler::policy_config;
use redline_operator::crd::{AutoscalingPolicy, AutoscalingPolicySpec, InferenceService};
use redline_operator::validate::problems;
use redline_testcluster::testing::repo;
use serde_json::Value;

/// The places where `original` has something `parsed` lacks or holds differently.
fn dropped(original: &Value, parsed: &Value, path: &str, out: &mut Vec<String>) {
    match (original, parsed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => dropped(v, w, &p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                dropped(v, w, &format!("{path}[{i}]"), out);
            }
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        _ if original == parsed => {}
        _ => out.push(format!("{path}: {original} became {parsed}")),
    }
}

/// The places where `v` breaks the OpenAPI schema `schema` as a 1.20 API server checks it:
/// type, minimum and maximum, enum. Unknown fields are [`dropped`]'s concern.
fn out_of_schema(schema: &Value, v: &Value, path: &str, out: &mut Vec<String>) {
    let ty = schema["type"].as_str();
    let ok_type = match (ty, v) {
        (None, _) | (_, Value::Null) => true,
        (Some("object"), Value::Object(_)) | (Some("array"), Value::Array(_)) => true,
        (Some("string"), Value::String(_)) | (Some("boolean"), Value::Bool(_)) => true,
        (Some("integer"), Value::Number(n)) => n.is_i64() || n.is_u64(),
        (Some("number"), Value::Number(_)) => true,
        _ => false,
    };
    if !ok_type {
        out.push(format!("{path}: {v} is not of type {}", ty.unwrap_or("?")));
        return;
    }
    if let Some(x) = v.as_f64() {
        if schema["minimum"].as_f64().is_some_and(|m| x < m) {
            out.push(format!(
                "{path}: {x} under the minimum {}",
                schema["minimum"]
            ));
        }
        if schema["maximum"].as_f64().is_some_and(|m| x > m) {
            out.push(format!(
                "{path}: {x} over the maximum {}",
                schema["maximum"]
            ));
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !v.is_null() && !allowed.contains(v) {
            out.push(format!("{path}: {v} is not one of {allowed:?}"));
        }
    }
    match v {
        Value::Object(fields) => {
            for (k, field) in fields {
                let p = format!("{path}.{k}");
                if let Some(s) = schema["properties"].get(k) {
                    out_of_schema(s, field, &p, out);
                } else if let Some(s) = schema.get("additionalProperties").filter(|s| s.is_object())
                {
                    out_of_schema(s, field, &p, out);
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                out_of_schema(&schema["items"], item, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The CRD's schema for `kind`, as generated from the Rust types.
fn schema_of(kind: &str) -> Value {
    for (_, yaml) in redline_operator::crd_yaml() {
        let crd: Value = serde_yaml::from_str(&yaml).expect("CRD YAML");
        if crd["spec"]["names"]["kind"] == kind {
            return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
        }
    }
    panic!("no CRD for {kind}")
}

fn check_schema(file: &str, doc: &Value) {
    let kind = doc["kind"].as_str().expect("kind");
    let mut broken = Vec::new();
    // metadata is the API server's, not the CRD's.
    out_of_schema(
        &schema_of(kind)["properties"]["spec"],
        &doc["spec"],
        ".spec",
        &mut broken,
    );
    assert!(
        broken.is_empty(),
        "{file}: the API server would refuse {broken:?}"
    );
}

fn documents() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("examples"))
        .expect("examples/")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "examples/ lost its manifests: {files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read example");
        for d in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(d).expect("YAML document");
            docs.push((f.file_name().unwrap().to_string_lossy().into_owned(), v));
        }
    }
    docs
}

fn check_round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(
    file: &str,
    doc: &Value,
) -> T {
    let parsed: T =
        serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{file}: {e}\n{doc:#}"));
    let mut lost = Vec::new();
    dropped(doc, &serde_json::to_value(&parsed).unwrap(), "", &mut lost);
    assert!(
        lost.is_empty(),
        "{file}: fields the CRD does not keep: {lost:?}"
    );
    parsed
}

#[test]
fn every_example_is_a_valid_resource_with_no_field_dropped() {
    let mut services = Vec::new();
    let mut policies = Vec::new();
    for (file, doc) in documents() {
        check_schema(&file, &doc);
        match doc["kind"].as_str() {
            Some("InferenceService") => {
                let s: InferenceService = check_round_trip(&file, &doc);
                let p = problems(&s.spec);
                assert!(p.is_empty(), "{file}: {p:?}");
                services.push((file, s));
            }
            Some("AutoscalingPolicy") => {
                let p: AutoscalingPolicy = check_round_trip(&file, &doc);
                policies.push(p);
            }
            other => panic!("{file}: unexpected kind {other:?}"),
        }
    }
    assert!(!services.is_empty() && !policies.is_empty());
    for (file, s) in &services {
        let a = s.spec.autoscaling.clone().unwrap_or_default();
        let spec: AutoscalingPolicySpec = match &a.policy_ref {
            Some(name) => policies
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(name.as_str()))
                .unwrap_or_else(|| panic!("{file}: policyRef {name} is not in examples/"))
                .spec
                .clone(),
            None => a.policy.unwrap_or_default(),
        };
        let c = policy_config(s, &spec);
        assert!(
            c.min_replicas >= 1 && c.min_replicas <= c.max_replicas,
            "{file}: {c:?}"
        );
        // Not a rule the operator enforces, but one an example should keep: a window shorter
        // than the horizon would drain replicas the forecast bought for within it.
        assert!(
            c.forecast_horizon_seconds >= 1.0
                && c.scale_down_window_seconds >= c.forecast_horizon_seconds
                && (0.05..=0.99).contains(&c.target_kv_usage)
                && c.capacity.prompt_tokens_per_second > 0.0
                && c.capacity.generation_tokens_per_second > 0.0,
            "{file}: {c:?}"
        );
        // A service with a TTFT objective plans by its error budget.
        if s.spec.slo.as_ref().and_then(|x| x.ttft_p99_ms).is_some() {
            assert!(c.ttft_objective_seconds.is_some(), "{file}");
        }
    }
}

#[test]
fn a_misspelled_field_is_caught() {
    let doc: Value = serde_json::json!({
        "apiVersion": "redline.dev/v1alpha1", "kind": "AutoscalingPolicy",
        "metadata": {"name": "p"},
        "spec": {"scaleDownWindowSecond": 30}
    });
    let mut lost = Vec::new();
    let parsed: AutoscalingPolicy = serde_json::from_value(doc.clone()).unwrap();
    dropped(&doc, &serde_json::to_value(&parsed).unwrap(), "", &mut lost);
    assert_eq!(lost, vec![".spec.scaleDownWindowSecond".to_string()]);
}

#[test]
fn a_value_out_of_the_crds_range_is_caught() {
    let doc: Value = serde_json::json!({
        "apiVersion": "redline.dev/v1alpha1", "kind": "AutoscalingPolicy",
        "metadata": {"name": "p"},
        "spec": {"targetKvUsage": 1.5, "maxStep": 0, "replicaCapacity": {"stepSeconds": 0.006},
                 "forecastHorizonSeconds": "60"}
    });
    let mut broken = Vec::new();
    let schema = schema_of("AutoscalingPolicy");
    out_of_schema(
        &schema["properties"]["spec"],
        &doc["spec"],
        ".spec",
        &mut broken,
    );
    broken.sort();
    assert_eq!(
        broken,
        vec![
            ".spec.forecastHorizonSeconds: \"60\" is not of type integer".to_string(),
            ".spec.maxStep: 0 under the minimum 1.0".to_string(),
            ".spec.targetKvUsage: 1.5 over the maximum 0.99".to_string(),
        ]
    );
}
