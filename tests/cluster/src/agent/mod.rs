//! The node agent: a "process kubelet" for machines without a container runtime. It registers
//! nodes, keeps them Ready, and runs the pods the real scheduler binds to them as local
//! processes, each pod in its own network namespace on a host bridge.

pub mod config;
pub mod container;
pub mod exec;
pub mod gpus;
pub mod network;
pub mod node;
pub mod pod_spec;
pub mod pod_worker;
pub mod probe;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::layout::{bridge_ip, APISERVER_PORT};
use config::AgentConfig;
use gpus::GpuAllocator;
use network::Network;
use pod_worker::PodEvent;

/// What every pod worker shares.
pub struct Ctx {
    pub client: Client,
    pub config: AgentConfig,
    pub network: Network,
    pub gpus: Mutex<GpuAllocator>,
    pub pods_dir: PathBuf,
    pub created_dirs_file: PathBuf,
    pub agent_exe: PathBuf,
    pub http: reqwest::Client,
    pub host_ip: String,
    /// Where pods reach the API server (the agent's proxy on the bridge).
    pub api_host: String,
    pub api_port: u16,
}

/// Forwards the bridge address's API port to the API server on loopback, so that pods (in their
/// own network namespaces) reach it as in-cluster clients do.
async fn api_proxy(listen: SocketAddr, upstream: SocketAddr) -> Result<()> {
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the API proxy on {listen}"))?;
    info!(%listen, %upstream, "API server proxy for pods");
    loop {
        let (mut down, _) = l.accept().await?;
        tokio::spawn(async move {
            if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            }
        });
    }
}

pub struct AgentOptions {
    pub config: AgentConfig,
    pub state_dir: PathBuf,
    pub created_dirs_file: PathBuf,
}

pub async fn run(client: Client, opts: AgentOptions) -> Result<()> {
    let network =
        Network::setup().context("setting up the pod bridge (needs root and iproute2)")?;
    let host_ip = bridge_ip().to_string();
    let ctx = Arc::new(Ctx {
        gpus: Mutex::new(GpuAllocator::new(
            opts.config.nodes.iter().map(|n| (n.name.as_str(), n.gpus)),
        )),
        client: client.clone(),
        network,
        pods_dir: opts.state_dir.join("pods"),
        created_dirs_file: opts.created_dirs_file,
        agent_exe: std::env::current_exe()?,
        http: reqwest::Client::builder().no_proxy().build()?,
        host_ip: host_ip.clone(),
        api_host: host_ip.clone(),
        api_port: APISERVER_PORT,
        config: opts.config,
    });
    std::fs::create_dir_all(&ctx.pods_dir)?;
    let proxy = tokio::spawn(api_proxy(
        SocketAddr::new(bridge_ip().into(), APISERVER_PORT),
        SocketAddr::from(([127, 0, 0, 1], APISERVER_PORT)),
    ));
    for n in &ctx.config.nodes {
        node::register(&client, n, &host_ip)
            .await
            .with_context(|| format!("registering node {}", n.name))?;
        info!(node = %n.name, gpus = n.gpus, "registered");
    }
    let heartbeat = tokio::spawn(node::heartbeat(
        client.clone(),
        ctx.config.nodes.clone(),
        host_ip,
    ));

    // One pod watch per node (a field selector cannot OR), merged.
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<(String, watcher::Event<Pod>)>();
    let mut watches = Vec::new();
    for n in &ctx.config.nodes {
        let api: Api<Pod> = Api::all(client.clone());
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", n.name));
        let (tx, node) = (ev_tx.clone(), n.name.clone());
        watches.push(tokio::spawn(async move {
            let mut s = watcher(api, cfg).default_backoff().boxed();
            let mut failing = false;
            while let Some(ev) = s.next().await {
                match ev {
                    Ok(ev) => {
                        failing = false;
                        if tx.send((node.clone(), ev)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        if !failing {
                            warn!(%node, "pod watch failed (retrying with back-off): {e}");
                        }
                        failing = true;
                    }
                }
            }
        }));
    }

    let mut workers: HashMap<
        String,
        (mpsc::UnboundedSender<PodEvent>, tokio::task::JoinHandle<()>),
    > = HashMap::new();
    let mut done: HashSet<String> = HashSet::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut reap = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            Some((node, ev)) = ev_rx.recv() => {
                let pods = match ev {
                    watcher::Event::Apply(p) | watcher::Event::InitApply(p) => vec![(p, false)],
                    watcher::Event::Delete(p) => vec![(p, true)],
                    watcher::Event::Init | watcher::Event::InitDone => vec![],
                };
                for (pod, deleted) in pods {
                    dispatch(&ctx, &mut workers, &done, node.clone(), pod, deleted).await;
                }
            }
            _ = reap.tick() => {
                workers.retain(|uid, (_, j)| {
                    if j.is_finished() { done.insert(uid.clone()); false } else { true }
                });
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    info!(pods = workers.len(), "shutting down: stopping pods");
    for w in watches {
        w.abort();
    }
    heartbeat.abort();
    proxy.abort();
    for (_, (tx, _)) in workers.iter() {
        let _ = tx.send(PodEvent::Shutdown);
    }
    for (_, (_, j)) in workers.drain() {
        let _ = j.await;
    }
    ctx.network.teardown();
    info!("stopped");
    Ok(())
}

async fn dispatch(
    ctx: &Arc<Ctx>,
    workers: &mut HashMap<String, (mpsc::UnboundedSender<PodEvent>, tokio::task::JoinHandle<()>)>,
    done: &HashSet<String>,
    node: String,
    pod: Pod,
    deleted: bool,
) {
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    if let Some((tx, _)) = workers.get(&uid) {
        let _ = tx.send(if deleted {
            PodEvent::Deleted
        } else {
            PodEvent::Updated(Box::new(pod))
        });
        return;
    }
    if deleted {
        return;
    }
    if done.contains(&uid) && pod.metadata.deletion_timestamp.is_none() {
        return;
    }
    let terminal = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    if pod.metadata.deletion_timestamp.is_some() || terminal {
        if pod.metadata.deletion_timestamp.is_some() {
            // Nothing of it runs here (e.g. the agent restarted): finish the deletion.
            let api: Api<Pod> = Api::namespaced(
                ctx.client.clone(),
                pod.metadata.namespace.as_deref().unwrap_or("default"),
            );
            let _ = api
                .delete(
                    pod.metadata.name.as_deref().unwrap_or(""),
                    &kube::api::DeleteParams::default().grace_period(0),
                )
                .await;
        }
        return;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let j = tokio::spawn(pod_worker::run(ctx.clone(), pod, node, rx));
    workers.insert(uid, (tx, j));
}
