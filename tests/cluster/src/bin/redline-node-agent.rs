//! The node agent ("process kubelet") of the local test cluster. `run` serves nodes; the
//! `exec-in-pod` subcommand is its own helper for starting a container inside a pod.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use redline_testcluster::agent::{self, config::AgentConfig, exec::ExecInPod, AgentOptions};
use redline_testcluster::cluster;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Register the configured nodes and run the pods bound to them.
    Run {
        #[arg(long)]
        kubeconfig: PathBuf,
        #[arg(long)]
        config: PathBuf,
        /// The cluster's state directory (pods' files and logs go under pods/).
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// (internal) Enter a pod's namespaces and exec its container's program.
    ExecInPod(ExecInPod),
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        // Before any thread exists: unsharing a mount namespace needs a single-threaded process.
        Cmd::ExecInPod(e) => {
            let err = e.run().unwrap_err();
            eprintln!("redline-node-agent exec-in-pod: {err:#}");
            std::process::exit(127);
        }
        Cmd::Run {
            kubeconfig,
            config,
            state_dir,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info,kube=warn".into()),
                )
                .with_ansi(false)
                .init();
            let exe = std::env::current_exe()?;
            let bin_dir = exe.parent().context("executable directory")?;
            let config = AgentConfig::load(&config, bin_dir, &state_dir.join("images"))?;
            tokio::runtime::Runtime::new()?.block_on(async {
                let client = cluster::client(&kubeconfig).await?;
                agent::run(
                    client,
                    AgentOptions {
                        config,
                        created_dirs_file: state_dir.join("created-dirs"),
                        state_dir,
                    },
                )
                .await
            })
        }
    }
}
