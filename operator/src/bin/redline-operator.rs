//! `redline-operator run` (the controller) and `redline-operator crd` (print the CRDs).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::http::StatusCode;
use axum::routing::get;
use clap::{Parser, Subcommand};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use redline_operator::autoscaler::Stop;
use redline_operator::children::Defaults;
use redline_operator::controller::{self, Context};
use redline_operator::leader::{LeaseLock, Role, RoleCell};
use redline_operator::metrics::Metrics;
use tracing::{info, warn};

#[derive(Parser)]
#[command(about = "redline's Kubernetes operator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the CRDs (YAML), as checked in under crds/.
    Crd,
    /// Write the CRDs into crds/ and charts/redline/crds/ of this source tree (the drift test
    /// compares both).
    CrdFiles,
    /// Run the controller (in-cluster config, or $KUBECONFIG).
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    #[arg(long, env = "REDLINE_ENGINE_IMAGE")]
    engine_image: Option<String>,
    #[arg(long, env = "REDLINE_SIDECAR_IMAGE")]
    sidecar_image: Option<String>,
    /// Run without a leader-election Lease (a single instance only).
    #[arg(long)]
    no_leader_election: bool,
    /// Namespace of the leader-election Lease (in-cluster: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, default_value = "redline-operator")]
    lease_name: String,
    /// Seconds between two passes of the autoscaling loop (pressure reads and decisions),
    /// 0.5 to 10: passes further apart than a report stays fresh leave gaps in the policy's
    /// data, and it drains nothing across a gap.
    #[arg(long, default_value_t = 5.0, value_parser = interval_seconds)]
    autoscale_interval_seconds: f64,
    /// This instance's identity in the Lease and in Events.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Watch and reconcile InferenceServices in this namespace alone (a Role there is then all
    /// the operator needs); every namespace when unset.
    #[arg(long, env = "WATCH_NAMESPACE", value_parser = namespace_name)]
    watch_namespace: Option<String>,
}

/// `--watch-namespace`: a namespace's name (a DNS label), so a typo is an error at start, not
/// an operator that watches nothing.
fn namespace_name(text: &str) -> Result<String, String> {
    let label = text.len() <= 63
        && text.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && text.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if label {
        Ok(text.to_string())
    } else {
        Err(format!(
            "{text:?} is not a namespace name (lowercase letters, digits and '-', at most 63)"
        ))
    }
}

/// `--autoscale-interval-seconds`: within [0.5, the policy's staleness limit].
fn interval_seconds(text: &str) -> Result<f64, String> {
    let most = redline_autoscale::defaults::STALE_AFTER_SECONDS;
    match text.parse::<f64>() {
        Ok(v) if (0.5..=most).contains(&v) => Ok(v),
        Ok(v) => Err(format!("{v} is outside 0.5 to {most} seconds")),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Crd => {
            for (i, (_, yaml)) in redline_operator::crd_yaml().into_iter().enumerate() {
                if i > 0 {
                    println!("---");
                }
                print!("{yaml}");
            }
            Ok(())
        }
        Cmd::CrdFiles => {
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            for dir in ["crds", "charts/redline/crds"] {
                std::fs::create_dir_all(root.join(dir))?;
                for (file, yaml) in redline_operator::crd_yaml() {
                    std::fs::write(root.join(dir).join(file), &yaml)?;
                    eprintln!("wrote {dir}/{file}");
                }
            }
            Ok(())
        }
        Cmd::Run(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info,kube=warn,kube_client=off".into()),
                )
                .with_ansi(false)
                .init();
            // The operator waits on the API server and the sidecars; two workers are plenty, and
            // each extra one would bring its own allocator arena.
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(run(args))
        }
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let config = kube::Config::infer()
        .await
        .context("Kubernetes client config (in-cluster or KUBECONFIG)")?;
    let client = redline_operator::client::bounded(config).context("Kubernetes client")?;
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("redline-operator-{}", std::process::id()));
    let metrics = Arc::new(Metrics::default());
    let mut defaults = Defaults::default();
    if let Some(i) = args.engine_image {
        defaults.engine_image = i;
    }
    if let Some(i) = args.sidecar_image {
        defaults.sidecar_image = i;
    }
    let role = Arc::new(RoleCell::default());
    let http = {
        let (m, r) = (metrics.clone(), role.clone());
        let app = axum::Router::new()
            .route(
                "/metrics",
                get({
                    let r = r.clone();
                    move || async move {
                        m.leader.set(i64::from(r.get() == Role::Leader));
                        m.render()
                    }
                }),
            )
            .route("/healthz", get(|| async { "ok" }))
            // Ready as leader or as standby (see leader.rs); the body says which.
            .route(
                "/readyz",
                get(move || async move {
                    match r.get() {
                        Role::Leader => (StatusCode::OK, "leader"),
                        Role::Standby => (StatusCode::OK, "standby"),
                        Role::Starting => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "starting: no answer about the leader Lease yet",
                        ),
                    }
                }),
            );
        let l = tokio::net::TcpListener::bind(args.http_addr).await?;
        info!(addr = %args.http_addr, "serving /metrics /healthz /readyz");
        tokio::spawn(async move { axum::serve(l, app).await })
    };
    match &args.watch_namespace {
        Some(ns) => info!(namespace = %ns, "watching one namespace"),
        None => info!("watching every namespace"),
    }
    let lock = (!args.no_leader_election).then(|| LeaseLock {
        api: Api::<Lease>::namespaced(client.clone(), &args.lease_namespace),
        name: args.lease_name.clone(),
        identity: identity.clone(),
        duration: Duration::from_secs(15),
        role: role.clone(),
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Lead, reconcile until leadership is lost (e.g. the API server was unreachable for longer
    // than the lease), then stop reconciling and campaign again, in the same process.
    loop {
        if let Some(l) = &lock {
            tokio::select! {
                _ = l.acquire() => {}
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        role.set(Role::Leader);
        let ctx = Arc::new(
            Context::new(
                client.clone(),
                defaults.clone(),
                metrics.clone(),
                identity.clone(),
            )
            .watching(args.watch_namespace.clone()),
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Stop>();
        let interval = Duration::from_secs_f64(args.autoscale_interval_seconds);
        let mut controller = tokio::spawn(controller::run(ctx, interval, async move {
            stop_rx.await.unwrap_or(Stop::LeadershipLost)
        }));
        let lost = async {
            match &lock {
                Some(l) => l.hold().await,
                None => std::future::pending().await,
            }
        };
        let stopping = tokio::select! {
            _ = term.recv() => { info!("SIGTERM: stopping"); true }
            _ = tokio::signal::ctrl_c() => true,
            _ = lost => { warn!("not the leader any more: reconciling stops until re-elected"); false }
        };
        // Not reconciling any more (the Lease may be held until released below).
        if role.get() == Role::Leader {
            role.set(Role::Standby);
        }
        // Stopping while leading, the loop hands its policies over (the Lease is still ours);
        // with leadership lost, another leader may be writing already.
        let _ = stop_tx.send(if stopping {
            Stop::HandOver
        } else {
            Stop::LeadershipLost
        });
        // A reconcile stuck on an unreachable API server must not outlive our leadership.
        if tokio::time::timeout(Duration::from_secs(10), &mut controller)
            .await
            .is_err()
        {
            controller.abort();
        }
        if stopping {
            // Only now: a standby that took over earlier could reconcile beside us.
            if let Some(l) = &lock {
                l.release().await;
            }
            break;
        }
    }
    http.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_refuse_what_cannot_work_at_start() {
        let run = |args: &[&str]| {
            Cli::try_parse_from(["redline-operator", "run"].iter().chain(args)).map(|c| {
                match c.cmd {
                    Cmd::Run(a) => a,
                    _ => unreachable!(),
                }
            })
        };
        let a = run(&["--watch-namespace", "team-a"]).unwrap();
        assert_eq!(a.watch_namespace.as_deref(), Some("team-a"));
        for bad in ["Team-A", "-a", "a_b", "", &"a".repeat(64)] {
            assert!(run(&["--watch-namespace", bad]).is_err(), "{bad:?}");
        }
        assert!(run(&["--autoscale-interval-seconds", "30"]).is_err());
    }
}
