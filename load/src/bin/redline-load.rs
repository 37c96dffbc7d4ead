//! `redline-load`: replays a slice of a request trace against an InferenceService's pods,
//! shows the autoscaling loop live, and ends with a summary table and a PNG.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use redline_load::report::{self, LIVE_HEADER};
use redline_load::run::{self, Config};
use redline_load::transport::Transport;
use redline_load::workload::{self, Slice, CODE_BURST, CODE_TRACE};
use redline_sim::trace::{self, Replay};

#[derive(Clone, Copy, ValueEnum)]
enum Via {
    /// Straight to each pod's IP (the host routes to pods; streams, so TTFT is measured).
    PodIp,
    /// Through the API server's pod proxy (any cluster; no TTFT).
    Proxy,
}

/// Defaults: `workload::CODE_BURST`, the code trace's first burst thinned for one CPU machine.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[arg(long, default_value = "default")]
    namespace: String,
    #[arg(long, default_value = "smollm2")]
    service: String,
    /// A trace in the Azure format (TIMESTAMP,ContextTokens,GeneratedTokens).
    #[arg(long, default_value = CODE_TRACE)]
    trace: PathBuf,
    #[arg(long, default_value_t = CODE_BURST.0.time_compression)]
    time_compression: f64,
    #[arg(long, default_value_t = CODE_BURST.0.token_scale)]
    token_scale: f64,
    /// Seconds into the (compressed) trace where the replay starts.
    #[arg(long, default_value_t = CODE_BURST.1.start)]
    start: f64,
    #[arg(long, default_value_t = CODE_BURST.1.duration)]
    duration: f64,
    #[arg(long, default_value_t = CODE_BURST.1.keep_every)]
    keep_every: usize,
    #[arg(long, default_value_t = CODE_BURST.1.max_prompt_tokens)]
    max_prompt_tokens: u32,
    #[arg(long, default_value_t = CODE_BURST.1.max_output_tokens)]
    max_output_tokens: u32,
    #[arg(long, value_enum, default_value = "pod-ip")]
    via: Via,
    /// After the replay, wait until the service is back to this many replicas.
    #[arg(long)]
    settle_to: Option<i32>,
    #[arg(long, default_value_t = 240)]
    settle_timeout_seconds: u64,
    #[arg(long, default_value_t = 2.0)]
    ttft_slo_seconds: f64,
    /// The guard's KV redline (the service's guardKvUsage).
    #[arg(long, default_value_t = 0.9)]
    redline: f64,
    #[arg(long, default_value = "target/redline-load.png")]
    plot: PathBuf,
    /// The service's API key, when it requires one (`spec.apiKeySecret`); straight at the
    /// pods only (the API server's pod proxy sends its own Authorization).
    #[arg(long, env = "REDLINE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let a = Args::parse();
    let full = trace::read(
        &a.trace,
        Replay {
            time_compression: a.time_compression,
            token_scale: a.token_scale,
            duration: None,
        },
    )?;
    let jobs = workload::slice(
        &full,
        &Slice {
            start: a.start,
            duration: a.duration,
            keep_every: a.keep_every,
            max_prompt_tokens: a.max_prompt_tokens,
            max_output_tokens: a.max_output_tokens,
        },
    );
    if jobs.is_empty() {
        bail!("no requests in that slice of {}", a.trace.display());
    }
    let client = kube::Client::try_default()
        .await
        .context("a Kubernetes client from $KUBECONFIG")?;
    let transport = match (a.via, &a.api_key) {
        (Via::PodIp, key) => {
            Transport::pod_ip_with_key(key.as_deref()).map_err(anyhow::Error::msg)?
        }
        (Via::Proxy, None) => Transport::Proxy(client.clone()),
        (Via::Proxy, Some(_)) => {
            bail!("--api-key needs --via pod-ip: the pod proxy cannot carry the engine's key")
        }
    };
    let prompt: u64 = jobs.iter().map(|j| j.prompt_tokens as u64).sum();
    println!(
        "replaying {} requests ({} prompt tokens) of {} over {:.0} s against {}/{}",
        jobs.len(),
        prompt,
        a.trace.display(),
        a.duration,
        a.namespace,
        a.service
    );
    println!("{LIVE_HEADER}");
    let cfg = Config {
        namespace: a.namespace.clone(),
        service: a.service.clone(),
        tick: Duration::from_millis(250),
        settle_to: a.settle_to,
        settle_timeout: Duration::from_secs(a.settle_timeout_seconds),
    };
    let mut shown = -10.0;
    let result = run::run(client, transport, &cfg, jobs, |s| {
        // Every 2 s, and whenever the decision changes.
        if s.t - shown >= 2.0 {
            println!("{}", report::live_row(s));
            shown = s.t;
        }
    })
    .await?;
    println!("\nEvents:");
    for e in &result.events {
        println!(
            "  {:>5.0}s  {:<15} x{:<3} {}",
            e.t, e.reason, e.count, e.note
        );
    }
    let summary = report::summarize(&result, a.ttft_slo_seconds, a.redline);
    println!("\n{}", report::table(&summary, a.ttft_slo_seconds));
    if let Some(dir) = a.plot.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    redline_load::plot::write(
        &a.plot,
        &format!(
            "redline-load: {}/{} under the code trace",
            a.namespace, a.service
        ),
        &result,
        a.redline,
    )?;
    println!("plot: {}", a.plot.display());
    for r in result
        .requests
        .iter()
        .filter_map(|r| r.result.as_ref().err())
        .take(5)
    {
        eprintln!("failed: {r}");
    }
    if summary.failed > 0 {
        bail!("{} of {} requests failed", summary.failed, summary.requests);
    }
    if a.settle_to.is_some() && !result.settled {
        bail!(
            "the service did not scale back to {:?} in time",
            a.settle_to
        );
    }
    Ok(())
}
