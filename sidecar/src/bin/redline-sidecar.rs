use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use redline_api::{GuardSettings, Limits};
use redline_sidecar::device::{self, DeviceKind};
use redline_sidecar::guard::GuardConfig;
use redline_sidecar::pressure::ModelConfig;
use redline_sidecar::{server, sidecar};

/// Watches an inference engine's KV pressure and device memory, guards it locally, and reports
/// to the redline operator.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    engine_url: String,
    /// The engine's admin API (localhost only), where the guard sets limits.
    #[arg(long, default_value = "http://127.0.0.1:8001")]
    engine_admin_url: String,
    #[arg(long, value_enum, default_value_t = DeviceKind::Auto)]
    device: DeviceKind,
    /// GPU index or UUID (default: the first of NVIDIA_VISIBLE_DEVICES, else 0).
    #[arg(long)]
    gpu: Option<String>,
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    #[arg(long, default_value_t = 8090)]
    port: u16,
    /// File holding the bearer token for /v1/pressure and /v1/limits (the mounted Secret).
    #[arg(
        long,
        env = "REDLINE_SIDECAR_TOKEN_FILE",
        required_unless_present = "probe_device"
    )]
    token_file: Option<PathBuf>,
    /// Scrape and guard interval, milliseconds.
    #[arg(long, default_value_t = 250)]
    interval_ms: u64,
    /// Guard horizon: act when the KV pool is forecast to redline within this many seconds.
    #[arg(long, default_value_t = 5.0)]
    guard_horizon_seconds: f64,
    /// KV usage ratio treated as redlined.
    #[arg(long, default_value_t = 0.9)]
    redline_ratio: f64,
    /// Observe and report only; never change the engine's limits.
    #[arg(long)]
    no_guard: bool,
    /// Seconds of samples the KV growth rate is fitted over.
    #[arg(long, default_value_t = 3.0)]
    window_seconds: f64,
    /// Print one device reading as JSON and exit (checks the backend; needs no engine or token).
    #[arg(long)]
    probe_device: bool,
    /// The engine's configured `max_num_seqs` (with `--max-batched-tokens`): the guard's target
    /// until the operator sets one. Without them, the engine's limits when first read, which
    /// after this sidecar restarts may be a cut it left.
    #[arg(long, requires = "max_batched_tokens")]
    max_num_seqs: Option<u32>,
    /// The engine's configured `max_batched_tokens` (at least 1).
    #[arg(long, requires = "max_num_seqs", value_parser = clap::value_parser!(u32).range(1..))]
    max_batched_tokens: Option<u32>,
}

// Two workers: the loop and the API never wait on each other, and a sidecar on a 16-core GPU
// node does not start 16 threads.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let a = Args::parse();
    anyhow::ensure!(
        redline_api::admission::valid_kv_share(a.redline_ratio),
        "--redline-ratio must be in (0, 1]"
    );
    anyhow::ensure!(a.interval_ms >= 10, "--interval-ms must be at least 10");
    let interval = Duration::from_millis(a.interval_ms);
    if a.probe_device {
        let dev = device::open(a.device, a.gpu.as_deref(), interval)?;
        println!("{}", serde_json::to_string_pretty(&dev.read())?);
        return Ok(());
    }
    let token_file = a.token_file.expect("clap requires --token-file");
    // Fail at start, not on the first request, when the Secret is not mounted.
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("reading the token file {}", token_file.display()))?;
    anyhow::ensure!(
        !token.trim().is_empty(),
        "the token file {} is empty",
        token_file.display()
    );
    let cfg = sidecar::Config {
        engine_url: a.engine_url,
        engine_admin_url: a.engine_admin_url,
        interval,
        token_file,
        guard: GuardSettings {
            enabled: !a.no_guard,
            horizon_seconds: a.guard_horizon_seconds,
            redline_ratio: a.redline_ratio,
        },
        model: ModelConfig {
            window_seconds: a.window_seconds,
            ..Default::default()
        },
        guard_config: GuardConfig::default(),
        configured: a
            .max_num_seqs
            .zip(a.max_batched_tokens)
            .map(|(seqs, tokens)| Limits::new(seqs, tokens)),
    };
    let dev = device::open(a.device, a.gpu.as_deref(), interval)?;
    let shared = Arc::new(sidecar::Shared::new(&cfg));
    let addr: SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .context("--host/--port")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, engine = %cfg.engine_url, guard = cfg.guard.enabled, "serving /v1/pressure /v1/limits /metrics /health");
    let app = server::router(shared.clone());
    let mut fast_loop = tokio::spawn(sidecar::run(shared, dev, cfg));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    });
    // Serving stale numbers without the loop would be worse than restarting: exit if it dies.
    tokio::select! {
        r = serve => r?,
        r = &mut fast_loop => anyhow::bail!("the pressure loop stopped: {r:?}"),
    }
    Ok(())
}
