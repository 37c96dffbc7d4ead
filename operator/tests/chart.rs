//! The Helm chart as `helm template` renders it (the real helm; no cluster): least-privilege
//! RBAC, a hardened operator pod, the values a Helm user sets (placement, pull secrets, pod
//! metadata, a metrics Service, a Prometheus Operator ServiceMonitor, a PodMonitor that finds
//! the engine pods the operator makes, and a Grafana dashboard of metrics redline exports)
//! landing where they belong, and values the schema does not know refused. The e2e installs the chart for real.

use redline_operator::children;
use redline_operator::crd::InferenceService;
use redline_testcluster::testing::{helm, repo};
use serde_yaml::Value;

/// `helm template` of the chart with `args`: the rendered documents, or helm's error.
fn render(args: &[&str]) -> Result<Vec<Value>, String> {
    let chart = repo().join("charts/redline");
    let out = std::process::Command::new(helm())
        .args(["template", "redline", chart.to_str().unwrap()])
        .args(["--namespace", "redline-system"])
        .args(args)
        .output()
        .expect("run helm");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    Ok(serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("a YAML document"))
        .filter(|v: &Value| !v.is_null())
        .collect())
}

fn kind<'a>(docs: &'a [Value], k: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == k).collect()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn the_rbac_grants_only_named_verbs_and_never_lists_secrets() {
    let docs = render(&[]).unwrap();
    let roles: Vec<&Value> = kind(&docs, "ClusterRole")
        .into_iter()
        .chain(kind(&docs, "Role"))
        .collect();
    assert_eq!(roles.len(), 2, "a ClusterRole and the Lease's Role");
    for role in roles {
        for rule in role["rules"].as_sequence().unwrap() {
            for field in ["apiGroups", "resources", "verbs"] {
                let v = strings(&rule[field]);
                assert!(!v.is_empty(), "{field} named in {rule:?}");
                assert!(!v.contains(&"*"), "a wildcard in {field}: {rule:?}");
            }
            let verbs = strings(&rule["verbs"]);
            if strings(&rule["resources"]).contains(&"secrets") {
                // The sidecar token is created and read by name; nobody's Secrets are listed.
                assert!(
                    verbs.iter().all(|v| ["get", "create"].contains(v)),
                    "{verbs:?}"
                );
            }
            assert!(!verbs.contains(&"escalate") && !verbs.contains(&"bind"));
        }
    }
    // The Lease is the one thing written in the operator's own namespace only.
    let role = kind(&docs, "Role")[0];
    assert_eq!(role["metadata"]["namespace"], "redline-system");
    assert!(strings(&role["rules"][0]["resources"]).contains(&"leases"));
}

/// `watchNamespace`: the same rules in a Role of that namespace, bound there, nothing
/// cluster-wide; the operator told the namespace; the PodMonitor looking there alone.
#[test]
fn watching_one_namespace_grants_a_role_there_and_nothing_cluster_wide() {
    let cluster = render(&[]).unwrap();
    let docs = render(&[
        "--set",
        "watchNamespace=team-a",
        "--set",
        "metrics.podMonitor.enabled=true",
    ])
    .unwrap();
    assert!(kind(&docs, "ClusterRole").is_empty());
    assert!(kind(&docs, "ClusterRoleBinding").is_empty());
    let named = |docs: &[Value], k: &str| -> Value {
        kind(docs, k)
            .into_iter()
            .find(|d| d["metadata"]["name"] == "redline-operator")
            .unwrap_or_else(|| panic!("a {k} named redline-operator"))
            .clone()
    };
    let role = named(&docs, "Role");
    assert_eq!(role["metadata"]["namespace"], "team-a");
    assert_eq!(role["rules"], named(&cluster, "ClusterRole")["rules"]);
    let binding = named(&docs, "RoleBinding");
    assert_eq!(binding["metadata"]["namespace"], "team-a");
    assert_eq!(binding["roleRef"]["kind"], "Role");
    assert_eq!(binding["subjects"][0]["namespace"], "redline-system");
    // The Lease stays in the operator's own namespace.
    assert!(kind(&docs, "Role")
        .iter()
        .any(|r| r["metadata"]["namespace"] == "redline-system"
            && strings(&r["rules"][0]["resources"]).contains(&"leases")));
    let env = &kind(&docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_sequence()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "WATCH_NAMESPACE" && e["value"] == "team-a"),
        "{env:?}"
    );
    let pm = kind(&docs, "PodMonitor")[0];
    assert_eq!(
        strings(&pm["spec"]["namespaceSelector"]["matchNames"]),
        ["team-a"]
    );
    let err = render(&["--set", "watchNamespace=Team_A"]).expect_err("not a namespace name");
    assert!(err.contains("watchNamespace"), "{err}");
}

#[test]
fn the_operator_pod_is_hardened_and_its_metrics_service_finds_it() {
    let docs = render(&[]).unwrap();
    assert!(kind(&docs, "ServiceMonitor").is_empty(), "off by default");
    let dep = kind(&docs, "Deployment")[0];
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod["containers"][0]["securityContext"];
    assert_eq!(c["readOnlyRootFilesystem"], true);
    assert_eq!(c["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&c["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(
        pod["serviceAccountName"],
        kind(&docs, "ServiceAccount")[0]["metadata"]["name"]
    );
    for unset in ["affinity", "imagePullSecrets", "priorityClassName"] {
        assert!(pod[unset].is_null(), "{unset} rendered though not set");
    }
    let svc = kind(&docs, "Service")[0];
    let labels = dep["spec"]["template"]["metadata"]["labels"]
        .as_mapping()
        .unwrap();
    for (k, v) in svc["spec"]["selector"].as_mapping().unwrap() {
        assert_eq!(
            labels.get(k),
            Some(v),
            "the Service selects the operator's pods"
        );
    }
    let port_names: Vec<&str> = pod["containers"][0]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(port_names.contains(&svc["spec"]["ports"][0]["targetPort"].as_str().unwrap()));
    let off = render(&["--set", "metrics.service.enabled=false"]).unwrap();
    assert!(kind(&off, "Service").is_empty());
}

#[test]
fn placement_pull_secrets_pod_metadata_and_a_service_monitor_land_where_they_belong() {
    let values = std::env::temp_dir().join(format!("redline-chart-{}.yaml", std::process::id()));
    std::fs::write(
        &values,
        r#"
nodeSelector: {pool: system}
tolerations: [{key: dedicated, operator: Equal, value: system, effect: NoSchedule}]
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector: {matchLabels: {app.kubernetes.io/name: redline-operator}}
priorityClassName: system-cluster-critical
imagePullSecrets: [{name: regcred}]
podAnnotations: {team: ml-platform}
podLabels: {cost-center: inference}
metrics:
  serviceMonitor: {enabled: true, interval: 15s, labels: {release: prometheus}}
"#,
    )
    .unwrap();
    let docs = render(&["--values", values.to_str().unwrap()]).unwrap();
    let dep = kind(&docs, "Deployment")[0];
    let tpl = &dep["spec"]["template"];
    let pod = &tpl["spec"];
    assert_eq!(pod["nodeSelector"]["pool"], "system");
    assert_eq!(pod["tolerations"][0]["key"], "dedicated");
    assert_eq!(
        pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
            ["weight"],
        100
    );
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");
    assert_eq!(pod["imagePullSecrets"][0]["name"], "regcred");
    assert_eq!(tpl["metadata"]["annotations"]["team"], "ml-platform");
    assert_eq!(tpl["metadata"]["labels"]["cost-center"], "inference");
    // The extra label does not enter the selector (a Deployment's selector is immutable).
    assert!(dep["spec"]["selector"]["matchLabels"]["cost-center"].is_null());

    let sm = kind(&docs, "ServiceMonitor")[0];
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
    let svc = kind(&docs, "Service")[0];
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(
            svc["metadata"]["labels"].get(k),
            Some(v),
            "the ServiceMonitor selects the metrics Service"
        );
    }
    let ep = &sm["spec"]["endpoints"][0];
    assert_eq!(ep["port"], svc["spec"]["ports"][0]["name"]);
    assert_eq!(
        (ep["path"].as_str(), ep["interval"].as_str()),
        (Some("/metrics"), Some("15s"))
    );
    // The per-service series' `namespace` is the InferenceService's, not the operator pod's.
    assert_eq!(ep["honorLabels"], true);
    assert_eq!(
        strings(&sm["spec"]["namespaceSelector"]["matchNames"]),
        ["redline-system"]
    );
}

/// The PodMonitor finds the pods the operator makes for the example: its selector is a subset
/// of their labels, its ports are their engine's and sidecar's, and the InferenceService's
/// name comes from a label they carry.
#[test]
fn the_pod_monitor_scrapes_the_engines_and_sidecars_of_every_service() {
    assert!(
        kind(&render(&[]).unwrap(), "PodMonitor").is_empty(),
        "off by default"
    );
    let docs = render(&["--set", "metrics.podMonitor.enabled=true"]).unwrap();
    let pm = kind(&docs, "PodMonitor")[0];
    assert_eq!(pm["spec"]["namespaceSelector"]["any"], true);
    let text = std::fs::read_to_string(repo().join("examples/smollm2.yaml")).unwrap();
    let isvc: InferenceService = serde_yaml::from_str(&text).unwrap();
    let dep = children::deployment(&isvc, &children::Defaults::default());
    let tpl = dep.spec.unwrap().template;
    let labels = tpl.metadata.unwrap().labels.unwrap();
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(
            labels.get(k.as_str().unwrap()).map(String::as_str),
            v.as_str(),
            "{k:?}: the engine pods' labels {labels:?}"
        );
    }
    let ports: Vec<String> = tpl
        .spec
        .unwrap()
        .containers
        .iter()
        .flat_map(|c| c.ports.clone().unwrap_or_default())
        .filter_map(|p| p.name)
        .collect();
    let endpoints = pm["spec"]["podMetricsEndpoints"].as_sequence().unwrap();
    let scraped: Vec<&str> = endpoints
        .iter()
        .map(|e| e["port"].as_str().unwrap())
        .collect();
    assert_eq!(scraped, ["http", "pressure"]);
    for e in endpoints {
        assert!(
            ports.iter().any(|p| p == e["port"].as_str().unwrap()),
            "{ports:?}"
        );
        assert_eq!(e["path"], "/metrics");
        let r = &e["relabelings"][0];
        let from = r["sourceLabels"][0].as_str().unwrap();
        let label = from
            .strip_prefix("__meta_kubernetes_pod_label_")
            .expect("a pod label");
        let carried = labels
            .iter()
            .find(|(k, _)| k.replace(['.', '/', '-'], "_") == label)
            .map(|(_, v)| v.as_str());
        assert_eq!(carried, Some(isvc.metadata.name.as_deref().unwrap()));
        assert_eq!(r["targetLabel"], "inferenceservice");
    }
}

#[test]
fn values_the_schema_does_not_know_are_refused_with_a_reason() {
    for (set, says) in [
        ("replicaCount=2", "replicaCount"),
        ("metrics.serviceMonitor.interval=often", "interval"),
        ("metrics.podMonitor.scrape=true", "scrape"),
        ("imagePullSecrets[0].secret=x", "secret"),
        (
            "metrics.serviceMonitor.enabled=true,metrics.service.enabled=false",
            "needs metrics.service.enabled",
        ),
    ] {
        let err = render(&["--set", set]).expect_err(set);
        assert!(err.contains(says), "{set}: {err}");
    }
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_redline_exports() {
    assert!(
        kind(&render(&[]).unwrap(), "ConfigMap").is_empty(),
        "off by default"
    );
    let docs = render(&[
        "--set",
        "grafana.dashboard.enabled=true",
        "--set",
        "grafana.dashboard.namespace=monitoring",
    ])
    .unwrap();
    let cm = kind(&docs, "ConfigMap")[0];
    assert_eq!(cm["metadata"]["namespace"], "monitoring");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let text = cm["data"]["redline.json"].as_str().expect("the dashboard");
    let dash: serde_json::Value = serde_json::from_str(text).expect("JSON");
    let mut exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 8, "{exprs:?}");
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            exprs.push(q.to_string());
        }
    }
    // The operator's metrics, and (through the PodMonitor) the engines' and sidecars'.
    let names: Vec<String> = [
        redline_operator::metrics::Metrics::default()
            .names()
            .to_vec(),
        redline_engine::metrics::Metrics::new("m").names(),
        redline_sidecar::metrics::Metrics::default()
            .names()
            .to_vec(),
    ]
    .concat();
    for family in ["operator", "engine", "sidecar"] {
        let prefix = format!("redline_{family}_");
        assert!(
            exprs.iter().any(|e| e.contains(&prefix)),
            "no panel reads the {family}'s metrics"
        );
    }
    for e in &exprs {
        let used: Vec<&str> = e
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("redline_"))
            .collect();
        assert!(!used.is_empty(), "{e}: queries no redline metric");
        for m in used {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| m.strip_suffix(s))
                .unwrap_or(m);
            assert!(
                names.iter().any(|n| n == base),
                "{e}: {m} is not a metric redline exports ({names:?})"
            );
        }
    }
}
