//! `redline-engine bench`: the same streaming load against redline and llama.cpp's
//! `llama-server --parallel N` (its continuous batching), same GGUF, same thread count, in one
//! run, one table. Each concurrency level gets fresh server processes so peak RSS is per level.
//! Every stream sends its own random 128-token prompt (no prefix-cache advantage for anyone)
//! and generates exactly 128 tokens (`ignore_eos`).

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// GGUF model. Default: the cached default model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Compute threads for both engines.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Concurrent streams, one row each.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub streams: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub output_tokens: usize,
    /// llama-server binary; default: found in the cache scripts/build-llama-cpp.sh fills.
    #[arg(long, env = "LLAMA_SERVER")]
    pub llama_server: Option<PathBuf>,
    /// redline weight format.
    #[arg(long, value_enum, default_value_t = crate::model::WeightFormat::Q4_1)]
    pub weights: crate::model::WeightFormat,
}

#[derive(Debug, Clone, Default)]
struct Row {
    tokens_per_s: f64,
    ttft_p50: f64,
    ttft_p99: f64,
    itl_p50: f64,
    itl_p99: f64,
    peak_rss_mib: f64,
}

/// A server process, killed when dropped.
pub(crate) struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where a server's log goes, so a failed run can be diagnosed.
pub(crate) fn log_path(name: &str, streams: usize) -> PathBuf {
    std::env::temp_dir().join(format!("redline-bench-{name}-{streams}.log"))
}

pub(crate) fn log_file(name: &str, streams: usize) -> Result<std::fs::File> {
    let p = log_path(name, streams);
    std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(18080)
}

pub(crate) fn default_llama_server() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let p = base.join("redline/llama.cpp-0.3.36/build/bin/llama-server");
    p.exists().then_some(p)
}

/// The started server once `ready_path` answers on `port`.
pub(crate) async fn when_ready(mut child: Child, port: u16, ready_path: &str) -> Result<Proc> {
    wait_ready(&format!("http://127.0.0.1:{port}{ready_path}"), &mut child).await?;
    Ok(Proc(child))
}

async fn wait_ready(url: &str, child: &mut Child) -> Result<()> {
    let c = reqwest::Client::new();
    for _ in 0..1200 {
        if let Some(st) = child.try_wait()? {
            bail!("server exited during start: {st}");
        }
        if let Ok(r) = c.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{url} not ready after 120 s")
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub(crate) fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// One streaming request; returns (TTFT, inter-chunk gaps, tokens generated).
pub(crate) async fn one_stream(
    c: &reqwest::Client,
    url: &str,
    prompt: Vec<u32>,
    n: usize,
) -> Result<(f64, Vec<f64>, usize)> {
    let body = json!({"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": true,
                      "ignore_eos": true, "stream_options": {"include_usage": true}});
    let t0 = Instant::now();
    let r = c.post(url).json(&body).send().await?;
    if !r.status().is_success() {
        bail!(
            "{url}: {} {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    let mut s = r.bytes_stream();
    let (mut buf, mut first, mut last, mut gaps, mut usage) =
        (String::new(), None, None, vec![], None);
    let mut chunks = 0usize;
    while let Some(b) = s.next().await {
        buf.push_str(&String::from_utf8_lossy(&b?));
        while let Some(i) = buf.find("\n\n") {
            let ev: String = buf.drain(..i + 2).collect();
            let Some(data) = ev.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(data)?;
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage = Some(n as usize);
            }
            let has_text = v["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty());
            if has_text {
                let now = t0.elapsed().as_secs_f64();
                match last {
                    None => first = Some(now),
                    Some(l) => gaps.push(now - l),
                }
                last = Some(now);
                chunks += 1;
            }
        }
    }
    Ok((
        first.context("no token arrived")?,
        gaps,
        usage.unwrap_or(chunks),
    ))
}

async fn load(url: &str, streams: usize, args: &BenchArgs, vocab: u32) -> Result<Row> {
    // No idle pooling: a server may close a kept-alive connection between the warm-up and the
    // run, and a reused dead connection would fail the run.
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    // Warm-up so first-request costs (page faults, lazy init) hit neither engine's numbers.
    one_stream(&c, url, (0..16).map(|i| 1000 + i).collect(), 4).await?;
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|s| {
            let prompt: Vec<u32> = (0..args.prompt_tokens)
                .map(|i| 100 + ((s * 7919 + i * 104_729) as u32 % (vocab - 200)))
                .collect();
            let (c, url, n) = (c.clone(), url.to_string(), args.output_tokens);
            tokio::spawn(async move { one_stream(&c, &url, prompt, n).await })
        })
        .collect();
    let (mut ttft, mut itl, mut tokens) = (vec![], vec![], 0);
    for t in tasks {
        let (f, g, n) = t.await??;
        ttft.push(f);
        itl.extend(g);
        tokens += n;
    }
    let wall = t0.elapsed().as_secs_f64();
    Ok(Row {
        tokens_per_s: tokens as f64 / wall,
        ttft_p50: pct(&mut ttft, 0.5),
        ttft_p99: pct(&mut ttft, 0.99),
        itl_p50: pct(&mut itl, 0.5),
        itl_p99: pct(&mut itl, 0.99),
        peak_rss_mib: 0.0,
    })
}

async fn bench_redline(model: &Path, streams: usize, args: &BenchArgs, vocab: u32) -> Result<Row> {
    let (port, admin) = (free_port(), free_port());
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--admin-port",
            &admin.to_string(),
            "--threads",
            &args.threads.to_string(),
        ])
        .args(["--weights", &weights_flag(args.weights)])
        .args([
            "--max-num-seqs-ceiling",
            &streams.max(1).to_string(),
            "--max-batched-tokens",
            "512",
        ])
        .arg("--model")
        .arg(model)
        .stdout(Stdio::null())
        .stderr(log_file("redline", streams)?)
        .spawn()?;
    measure(child, port, "/ready", "redline", streams, args, vocab).await
}

async fn bench_llama(
    bin: &Path,
    model: &Path,
    streams: usize,
    args: &BenchArgs,
    vocab: u32,
) -> Result<Row> {
    let port = free_port();
    let per_slot = args.prompt_tokens + args.output_tokens + 32;
    let child = Command::new(bin)
        .args(["-m"])
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "-t",
            &args.threads.to_string(),
            "-tb",
            &args.threads.to_string(),
        ])
        .args([
            "--parallel",
            &streams.to_string(),
            "-c",
            &(per_slot * streams.max(1)).to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(log_file("llama-server", streams)?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    measure(child, port, "/health", "llama-server", streams, args, vocab).await
}

/// Waits for a started server, runs the load against it, and reads its peak RSS.
async fn measure(
    child: Child,
    port: u16,
    ready_path: &str,
    name: &str,
    streams: usize,
    args: &BenchArgs,
    vocab: u32,
) -> Result<Row> {
    let pid = child.id();
    let _server = when_ready(child, port, ready_path).await?;
    let url = format!("http://127.0.0.1:{port}/v1/completions");
    let mut row = load(&url, streams, args, vocab).await.with_context(|| {
        format!(
            "{name} run failed; its log is {}",
            log_path(name, streams).display()
        )
    })?;
    row.peak_rss_mib = peak_rss_mib(pid);
    Ok(row)
}

/// The GGUF to bench (the cached default model unless given) and its vocabulary size.
pub(crate) fn model_and_vocab(model: Option<&Path>) -> Result<(PathBuf, u32)> {
    let model = match model {
        Some(p) => p.to_path_buf(),
        None => crate::fetch::fetch_default_model(&crate::fetch::model_cache_dir(), true)?,
    };
    let (ct, _) = crate::model::read_gguf(&model)?;
    let vocab = crate::model::LlamaConfig::from_gguf(&ct)?.vocab as u32;
    Ok((model, vocab))
}

pub async fn run(args: BenchArgs) -> Result<()> {
    let (model, vocab) = model_and_vocab(args.model.as_deref())?;
    let peer = args.llama_server.clone().or_else(default_llama_server);
    if peer.is_none() {
        eprintln!("llama-server not found: the peer column stays empty (build it with scripts/build-llama-cpp.sh, ~24 min)");
    }
    println!(
        "model {} | threads {} | prompt {} | output {} | cpu {}",
        model.display(),
        args.threads,
        args.prompt_tokens,
        args.output_tokens,
        cpu_name()
    );
    println!(
        "| streams | engine | tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | peak RSS | tok/s vs llama.cpp |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &args.streams {
        let ours = bench_redline(&model, n, &args, vocab).await?;
        let theirs = match &peer {
            Some(bin) => Some(bench_llama(bin, &model, n, &args, vocab).await?),
            None => None,
        };
        let fmt = |name: &str, r: &Row, ratio: String| {
            println!(
                "| {n} | {name} | {:.1} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} MiB | {ratio} |",
                r.tokens_per_s,
                r.ttft_p50 * 1e3,
                r.ttft_p99 * 1e3,
                r.itl_p50 * 1e3,
                r.itl_p99 * 1e3,
                r.peak_rss_mib
            )
        };
        match theirs {
            Some(t) => {
                fmt(
                    "redline",
                    &ours,
                    format!("**{:.2}x**", ours.tokens_per_s / t.tokens_per_s),
                );
                fmt("llama.cpp", &t, "1.00x".into());
            }
            None => fmt("redline", &ours, "peer missing".into()),
        }
    }
    Ok(())
}

pub(crate) fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub(crate) fn weights_flag(w: crate::model::WeightFormat) -> String {
    use clap::ValueEnum;
    w.to_possible_value()
        .map_or("q8-0".into(), |v| v.get_name().to_string())
}
