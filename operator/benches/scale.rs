//! Scale benchmark (issue 5): N InferenceServices (replicas 0) created at once on the cluster;
//! prints the time until every one has a current `observedGeneration`, the operator's peak RSS
//! and its reconcile-duration p50/p99. Runs the operator as a local process (to read its RSS)
//! against `$KUBECONFIG` or the local cluster.
//!
//!     cargo bench -p redline-operator --bench scale [-- --count 500]

use std::time::{Duration, Instant};

use futures::{stream, StreamExt};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, CustomResourceExt};
use redline_operator::crd::{AutoscalingPolicy, InferenceService};
use redline_testcluster::testing::{client, kubeconfig_path, TestNs};

fn peak_rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Quantile from a Prometheus histogram's cumulative buckets (upper bound of the bucket).
fn quantile(metrics: &str, name: &str, q: f64) -> f64 {
    redline_api::prom::Exposition::parse(metrics)
        .ok()
        .and_then(|m| m.histogram(name))
        .map_or(f64::NAN, |h| h.quantile_bound(q))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let count: usize = args
        .iter()
        .position(|a| a == "--count")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(500);
    let client = client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [InferenceService::crd(), AutoscalingPolicy::crd()] {
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(
            &name,
            &PatchParams::apply("redline-bench").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let port = 18099;
    let mut op = std::process::Command::new(env!("CARGO_BIN_EXE_redline-operator"))
        .args([
            "run",
            "--no-leader-election",
            &format!("--http-addr=127.0.0.1:{port}"),
        ])
        .env("KUBECONFIG", kubeconfig_path())
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("starting the operator");
    let ns = TestNs::new(&client, "rl-bench").await;
    let isvcs: Api<InferenceService> = Api::namespaced(client.clone(), &ns.name);
    eprintln!("creating {count} InferenceServices in {} ...", ns.name);
    let start = Instant::now();
    let created: Vec<_> = stream::iter(0..count)
        .map(|i| {
            let isvcs = isvcs.clone();
            async move {
                let obj: InferenceService = serde_json::from_value(serde_json::json!({
                    "apiVersion": "redline.dev/v1alpha1", "kind": "InferenceService",
                    "metadata": {"name": format!("svc-{i:04}")},
                    "spec": {"model": {"default": {}}, "replicas": 0, "minReplicas": 0, "maxReplicas": 2}
                }))
                .unwrap();
                isvcs.create(&PostParams::default(), &obj).await
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let failed = created.iter().filter(|r| r.is_err()).count();
    let created_in = start.elapsed();
    let mut last_progress = Instant::now();
    let done_in = loop {
        let list = isvcs.list(&ListParams::default()).await.unwrap().items;
        let current = list
            .iter()
            .filter(|i| {
                i.status.as_ref().and_then(|s| s.observed_generation) == i.metadata.generation
            })
            .count();
        if last_progress.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "  {current}/{count} reconciled after {:.1}s",
                start.elapsed().as_secs_f64()
            );
            last_progress = Instant::now();
        }
        if current >= count - failed {
            break start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "not all reconciled within 10 min ({current}/{count})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let rss = peak_rss_mib(op.id());
    let h = "redline_operator_reconcile_duration_seconds";
    println!();
    println!("| InferenceServices | create failures | created in | all reconciled in | operator peak RSS | reconcile p50 | reconcile p99 |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {count} | {failed} | {:.1} s | {:.1} s | {rss:.1} MiB | ≤ {:.0} ms | ≤ {:.0} ms |",
        created_in.as_secs_f64(),
        done_in.as_secs_f64(),
        quantile(&metrics, h, 0.5) * 1000.0,
        quantile(&metrics, h, 0.99) * 1000.0,
    );
    println!("targets: all reconciled within 60 s, RSS < 64 MiB");
    let _ = op.kill();
    let _ = op.wait();
}
