//! `redline-cluster up | down | status`: the local Kubernetes 1.20 test cluster.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use redline_testcluster::cluster::{self, UpOptions};
use redline_testcluster::layout::Layout;

#[derive(Parser)]
#[command(about = "redline's local test cluster: real control plane, pods as local processes")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build (once, cached) and start etcd, the control plane and the node agent; prints the
    /// admin kubeconfig's path.
    Up {
        /// Nodes and image map (default: tests/cluster/cluster.yaml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Stop everything `up` started and remove its namespaces, bridge and mount points.
    Down,
    /// What runs, and the nodes. Exit status 1 when the cluster is not up.
    Status,
    /// Stop the API server and start it again (for tests of clients that must recover).
    RestartApiserver {
        /// Seconds to stay down.
        #[arg(long, default_value_t = 2)]
        down_seconds: u64,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let l = Layout::from_env();
    match Cli::parse().cmd {
        Cmd::Up { config } => {
            let exe = std::env::current_exe()?;
            let dir = exe.parent().context("executable directory")?;
            let opts = UpOptions {
                config: config.unwrap_or_else(|| {
                    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cluster.yaml")
                }),
                agent_exe: dir.join("redline-node-agent"),
            };
            if let Err(e) = cluster::up(&l, &opts).await {
                eprintln!("==> up failed; stopping what started");
                cluster::down(&l, true).await?;
                return Err(e);
            }
        }
        Cmd::Down => {
            eprintln!("==> stopping the cluster in {}", l.root.display());
            cluster::down(&l, true).await?;
        }
        Cmd::RestartApiserver { down_seconds } => {
            let t = cluster::restart_apiserver(&l, std::time::Duration::from_secs(down_seconds))
                .await?;
            eprintln!(
                "==> kube-apiserver ready again {:.1}s after it stopped",
                t.as_secs_f64()
            );
        }
        Cmd::Status => {
            if !cluster::status(&l).await? {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
