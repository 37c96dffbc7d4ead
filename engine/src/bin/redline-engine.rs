//! `redline-engine`: serve a GGUF model, fetch the default model, or benchmark.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "redline's LLM engine: paged KV cache, continuous batching, live batch limits, OpenAI-compatible API"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a model over the OpenAI-compatible API (and the admin API on localhost).
    Serve(redline_engine::server::ServeArgs),
    /// Benchmark against llama.cpp's llama-server on the same GGUF and thread count; prints a table.
    Bench(redline_engine::bench::BenchArgs),
    /// One burst above capacity against redline with and without its TTFT objective and
    /// llama.cpp: the share of requests served within the objective; prints a table.
    BurstBench(redline_engine::burst_bench::BurstArgs),
    /// Download the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) into the cache and print its path.
    FetchModel {
        /// Cache directory. Default: $REDLINE_MODEL_CACHE or $XDG_CACHE_HOME/redline/models.
        #[arg(long)]
        cache_dir: Option<std::path::PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Cmd::Serve(args) => {
            let threads = args
                .threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            // The engine's compute pool (matmuls, attention, candle's ops) takes its size from here.
            std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(redline_engine::server::serve(args))
        }
        Cmd::Bench(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?
            .block_on(redline_engine::bench::run(args)),
        Cmd::BurstBench(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?
            .block_on(redline_engine::burst_bench::run(args)),
        Cmd::FetchModel { cache_dir } => {
            let dir = cache_dir.unwrap_or_else(redline_engine::fetch::model_cache_dir);
            let path = redline_engine::fetch::fetch_default_model(&dir, true)?;
            println!("{}", path.display());
            Ok(())
        }
    }
}
