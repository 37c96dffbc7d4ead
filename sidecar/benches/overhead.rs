//! What the sidecar costs next to a busy engine: CPU share of one core and RSS, per sampling
//! interval, read from /proc while closed-loop clients keep the real engine (default model, all
//! cores) busy. Prints a table. Target at 250 ms: < 1% of one core, < 20 MiB RSS.
//!
//! `cargo bench -p redline-sidecar --bench overhead` (env: `SECONDS_PER_ROW`, default 30;
//! `CLIENTS`, default 8; `INTERVALS_MS`, default `250,100,1000`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{metric, Engine, Sidecar};
use serde_json::json;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at field 3.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// (VmRSS, VmHWM) in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

struct Row {
    interval_ms: u64,
    seconds: f64,
    scrapes: f64,
    cpu_pct: f64,
    rss: f64,
    peak_rss: f64,
    engine_cpu_pct: f64,
    engine_tok_s: f64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs: u64 = env_or("SECONDS_PER_ROW", 30);
    let clients: usize = env_or("CLIENTS", 8);
    let intervals: Vec<u64> = std::env::var("INTERVALS_MS")
        .unwrap_or_else(|_| "250,100,1000".into())
        .split(',')
        .map(|v| {
            v.trim()
                .parse()
                .expect("INTERVALS_MS: comma-separated milliseconds")
        })
        .collect();
    eprintln!("starting the engine (default model, 2 threads) and {clients} closed-loop clients");
    let engine = Engine::start("overhead", &["--kv-cache-mib", "64"]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let url = engine.url("/v1/completions");
    let load: Vec<_> = (0..clients)
        .map(|c| {
            let (stop, url) = (stop.clone(), url.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let prompt: Vec<u32> = (0..64)
                        .map(|k| 1000 + (c as u32 * 7919 + i * 104_729 + k * 31) % 40_000)
                        .collect();
                    let body = json!({"prompt": prompt, "max_tokens": 64, "ignore_eos": true});
                    let r = http.post(&url).json(&body).send().await;
                    assert!(r.is_ok_and(|r| r.status() == 200), "a load request failed");
                }
            })
        })
        .collect();
    // Let the batch fill before measuring.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut rows = vec![];
    for &interval_ms in &intervals {
        let sidecar = Sidecar::start(
            &format!("overhead-{interval_ms}"),
            &engine,
            &["--interval-ms", &interval_ms.to_string()],
        )
        .await;
        let pid = sidecar.child.id();
        let engine_pid = engine.child.id();
        // Warm-up (first scrapes, the HTTP client's connection), then measure.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (c0, e0, s0) = (cpu_seconds(pid), cpu_seconds(engine_pid), Instant::now());
        let scrapes0 = metric(&sidecar.metrics().await, "redline_sidecar_scrapes_total");
        let gen0 = metric(
            &engine.metrics().await,
            "redline_engine_generation_tokens_total",
        );
        eprintln!("measuring the sidecar at {interval_ms} ms for {secs} s");
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let seconds = s0.elapsed().as_secs_f64();
        let (c1, e1) = (cpu_seconds(pid), cpu_seconds(engine_pid));
        let (rss, peak_rss) = rss_mib(pid);
        let scrapes = metric(&sidecar.metrics().await, "redline_sidecar_scrapes_total") - scrapes0;
        let gen = metric(
            &engine.metrics().await,
            "redline_engine_generation_tokens_total",
        ) - gen0;
        let p = sidecar.pressure().await;
        assert!(p.engine_reachable, "the sidecar lost the engine: {p:?}");
        rows.push(Row {
            interval_ms,
            seconds,
            scrapes,
            cpu_pct: 100.0 * (c1 - c0) / seconds,
            rss,
            peak_rss,
            engine_cpu_pct: 100.0 * (e1 - e0) / seconds,
            engine_tok_s: gen / seconds,
        });
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        let _ = l.await;
    }

    println!();
    println!(
        "redline-sidecar overhead next to a busy redline-engine ({clients} clients, {} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| interval | measured | scrapes | sidecar CPU (% of 1 core) | RSS MiB | peak RSS MiB | engine CPU % | engine tok/s | target (<1%, <20 MiB) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in &rows {
        let meets = r.cpu_pct < 1.0 && r.peak_rss < 20.0;
        println!(
            "| {} ms | {:.0} s | {:.0} | {:.2} | {:.1} | {:.1} | {:.0} | {:.1} | {} |",
            r.interval_ms,
            r.seconds,
            r.scrapes,
            r.cpu_pct,
            r.rss,
            r.peak_rss,
            r.engine_cpu_pct,
            r.engine_tok_s,
            if r.interval_ms == 250 {
                if meets {
                    "met"
                } else {
                    "NOT met"
                }
            } else {
                "-"
            }
        );
    }
}
