//! `redline-engine burst-bench`: one open-loop burst, more prompt tokens per second than the
//! engine computes, against redline with arrival-order admission, redline with its TTFT
//! objective (deadline-aware admission), and llama.cpp's `llama-server` (arrival order), same
//! GGUF, same threads, same arrivals, in one run. What counts is the share of requests whose
//! first token came within the objective; every request must be answered.
//!
//! Arrivals are fixed (request i at i / rate seconds) and prompt lengths are drawn from a seeded
//! generator between `--min-prompt-tokens` and `--max-prompt-tokens`, so the three runs see the
//! same load.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::bench::{
    cpu_name, default_llama_server, free_port, log_file, log_path, model_and_vocab, one_stream,
    pct, weights_flag, when_ready,
};

#[derive(Debug, Clone, clap::Args)]
pub struct BurstArgs {
    /// GGUF model. Default: the cached default model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Requests per second during the burst.
    #[arg(long, default_value_t = 4.0)]
    pub rate: f64,
    /// Seconds the burst lasts.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 16)]
    pub min_prompt_tokens: usize,
    #[arg(long, default_value_t = 256)]
    pub max_prompt_tokens: usize,
    #[arg(long, default_value_t = 16)]
    pub output_tokens: usize,
    /// The TTFT objective, ms: what is counted, and what redline's deadline run is given.
    #[arg(long, default_value_t = 2000)]
    pub ttft_objective_ms: u64,
    /// Running sequences (llama.cpp: slots).
    #[arg(long, default_value_t = 16)]
    pub max_num_seqs: usize,
    /// Prefill chunk per step (redline's --max-batched-tokens, llama.cpp's -b).
    #[arg(long, default_value_t = 256)]
    pub max_batched_tokens: usize,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// llama-server binary; default: found in the cache scripts/build-llama-cpp.sh fills.
    #[arg(long, env = "LLAMA_SERVER")]
    pub llama_server: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = crate::model::WeightFormat::Q4_1)]
    pub weights: crate::model::WeightFormat,
}

#[derive(Debug, Clone, Default)]
struct Outcome {
    requests: usize,
    answered: usize,
    within: usize,
    ttft_p50: f64,
    ttft_p99: f64,
    wall: f64,
}

/// The burst: (send time in seconds, prompt token ids).
fn arrivals(a: &BurstArgs, vocab: u32) -> Vec<(f64, Vec<u32>)> {
    let n = (a.rate * a.duration).round() as usize;
    let mut x = a
        .seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1);
    let mut next = || {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (x >> 33) as usize
    };
    let span = a.max_prompt_tokens.saturating_sub(a.min_prompt_tokens) + 1;
    (0..n)
        .map(|i| {
            let len = a.min_prompt_tokens + next() % span;
            let prompt = (0..len)
                .map(|_| 100 + (next() as u32 % (vocab - 200)))
                .collect();
            (i as f64 / a.rate, prompt)
        })
        .collect()
}

async fn replay(url: &str, a: &BurstArgs, burst: &[(f64, Vec<u32>)]) -> Result<Outcome> {
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    // Warm-up: first-request costs, and a full step so redline knows its prefill speed.
    let warm: Vec<u32> = (0..a.max_batched_tokens as u32).map(|i| 1000 + i).collect();
    one_stream(&c, url, warm, 2).await?;
    let start = tokio::time::Instant::now();
    let tasks: Vec<_> = burst
        .iter()
        .map(|(at, prompt)| {
            let (c, url, prompt, n) = (c.clone(), url.to_string(), prompt.clone(), a.output_tokens);
            let when = start + Duration::from_secs_f64(*at);
            tokio::spawn(async move {
                tokio::time::sleep_until(when).await;
                one_stream(&c, &url, prompt, n).await
            })
        })
        .collect();
    let objective = a.ttft_objective_ms as f64 / 1e3;
    let mut o = Outcome {
        requests: burst.len(),
        ..Default::default()
    };
    let mut ttft = Vec::new();
    for t in tasks {
        match t.await? {
            Ok((f, _, _)) => {
                o.answered += 1;
                o.within += usize::from(f <= objective);
                ttft.push(f);
            }
            Err(e) => tracing::warn!("request failed: {e:#}"),
        }
    }
    o.wall = start.elapsed().as_secs_f64();
    o.ttft_p50 = pct(&mut ttft, 0.5);
    o.ttft_p99 = pct(&mut ttft, 0.99);
    Ok(o)
}

async fn measure(
    child: Child,
    port: u16,
    ready: &str,
    name: &str,
    a: &BurstArgs,
    burst: &[(f64, Vec<u32>)],
) -> Result<Outcome> {
    let _server = when_ready(child, port, ready).await?;
    replay(&format!("http://127.0.0.1:{port}/v1/completions"), a, burst)
        .await
        .with_context(|| {
            format!(
                "{name} run failed; its log is {}",
                log_path(name, 0).display()
            )
        })
}

async fn redline(
    model: &Path,
    a: &BurstArgs,
    deadline: bool,
    burst: &[(f64, Vec<u32>)],
) -> Result<Outcome> {
    let (port, admin) = (free_port(), free_port());
    let name = if deadline {
        "redline-deadline"
    } else {
        "redline-fcfs"
    };
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--admin-port", &admin.to_string()])
        .args(["--threads", &a.threads.to_string()])
        .args(["--weights", &weights_flag(a.weights)])
        .args(["--max-num-seqs-ceiling", &a.max_num_seqs.to_string()])
        .args(["--max-batched-tokens", &a.max_batched_tokens.to_string()])
        .arg("--model")
        .arg(model);
    if deadline {
        cmd.args(["--ttft-objective-ms", &a.ttft_objective_ms.to_string()]);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(log_file(name, 0)?)
        .spawn()?;
    measure(child, port, "/ready", name, a, burst).await
}

async fn llama(
    bin: &Path,
    model: &Path,
    a: &BurstArgs,
    burst: &[(f64, Vec<u32>)],
) -> Result<Outcome> {
    let port = free_port();
    let per_slot = a.max_prompt_tokens + a.output_tokens + 32;
    let child = Command::new(bin)
        .arg("-m")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-t", &a.threads.to_string(), "-tb", &a.threads.to_string()])
        .args(["--parallel", &a.max_num_seqs.to_string()])
        .args(["-c", &(per_slot * a.max_num_seqs).to_string()])
        .args(["-b", &a.max_batched_tokens.to_string()])
        .stdout(Stdio::null())
        .stderr(log_file("llama-server", 0)?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    measure(child, port, "/health", "llama-server", a, burst).await
}

pub async fn run(a: BurstArgs) -> Result<()> {
    let (model, vocab) = model_and_vocab(a.model.as_deref())?;
    let burst = arrivals(&a, vocab);
    let tokens: usize = burst.iter().map(|b| b.1.len()).sum();
    println!(
        "model {} | threads {} | {} requests in {} s ({:.0} prompt tokens/s), prompts {}-{} tokens, {} out | TTFT objective {} ms | cpu {}",
        model.display(),
        a.threads,
        burst.len(),
        a.duration,
        tokens as f64 / a.duration,
        a.min_prompt_tokens,
        a.max_prompt_tokens,
        a.output_tokens,
        a.ttft_objective_ms,
        cpu_name()
    );
    println!("| engine | admission | answered | TTFT within objective | TTFT p50 | TTFT p99 | burst served in |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let row = |engine: &str, admission: &str, o: &Outcome| {
        println!(
            "| {engine} | {admission} | {}/{} | **{:.1}%** | {:.2} s | {:.2} s | {:.1} s |",
            o.answered,
            o.requests,
            100.0 * o.within as f64 / o.requests.max(1) as f64,
            o.ttft_p50,
            o.ttft_p99,
            o.wall
        )
    };
    row(
        "redline",
        "deadline",
        &redline(&model, &a, true, &burst).await?,
    );
    row(
        "redline",
        "arrival order",
        &redline(&model, &a, false, &burst).await?,
    );
    match a.llama_server.clone().or_else(default_llama_server) {
        Some(bin) => row(
            "llama.cpp",
            "arrival order",
            &llama(&bin, &model, &a, &burst).await?,
        ),
        None => {
            eprintln!("llama-server not found: no peer row (scripts/build-llama-cpp.sh builds it)")
        }
    }
    Ok(())
}
