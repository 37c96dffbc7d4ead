//! `up`, `down` and `status` of the whole local cluster.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::control_plane::{self as cp, apiserver_url};
use crate::layout::{bridge_ip, Layout};
use crate::{pki, process};

pub const NODE_AGENT: &str = "node-agent";

/// Daemons in start order; `down` stops them in reverse.
const DAEMONS: [&str; 5] = [
    cp::ETCD,
    cp::APISERVER,
    cp::CONTROLLER_MANAGER,
    cp::SCHEDULER,
    NODE_AGENT,
];

pub async fn config(kubeconfig: &Path) -> Result<Config> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    Ok(Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?)
}

pub async fn client(kubeconfig: &Path) -> Result<Client> {
    Ok(Client::try_from(config(kubeconfig).await?)?)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(program))
            .find(|f| f.is_file())
    })
}

pub struct UpOptions {
    pub config: PathBuf,
    pub agent_exe: PathBuf,
}

pub async fn up(l: &Layout, opts: &UpOptions) -> Result<()> {
    let t0 = Instant::now();
    if DAEMONS
        .iter()
        .all(|d| process::running(&l.pids(), d).is_some())
    {
        eprintln!("==> the cluster is already up ({})", l.root.display());
        println!("{}", l.admin_kubeconfig().display());
        return Ok(());
    }
    let etcd = which("etcd").context(
        "etcd not found: install Debian's etcd-server (apt-get install etcd-server), as .ci/run does",
    )?;
    which("ip").context("ip not found: install iproute2")?;
    let bin_dir = opts.agent_exe.parent().context("agent path")?;
    let nodes =
        crate::agent::config::AgentConfig::load(&opts.config, bin_dir, &l.root.join("images"))?
            .nodes
            .len();
    let bins = cp::ensure_k8s_binaries()?;
    // Whatever a crashed earlier run left: stop it, and start from a clean state directory.
    down(l, false).await?;
    let _ = std::fs::remove_dir_all(&l.root);
    std::fs::create_dir_all(&l.root)?;
    eprintln!("==> [1/5] PKI and kubeconfigs in {}", l.root.display());
    pki::generate(&l.pki(), &[[127, 0, 0, 1].into(), bridge_ip()])?;
    for id in pki::CLIENTS {
        std::fs::write(
            l.kubeconfig(id.file_stem),
            pki::kubeconfig(&l.pki(), &id, &apiserver_url()),
        )?;
    }
    eprintln!(
        "==> [2/5] etcd and kube-apiserver {}",
        crate::layout::K8S_VERSION
    );
    let apiserver_bin = bins.join(cp::APISERVER);
    let cm_bin = bins.join(cp::CONTROLLER_MANAGER);
    let sched_bin = bins.join(cp::SCHEDULER);
    for d in [cp::etcd(l, &etcd), cp::apiserver(l, &apiserver_bin)] {
        process::spawn(&l.pids(), &l.logs(), &d)?;
    }
    let ready = cp::wait_readyz(l, Duration::from_secs(90)).await?;
    eprintln!("    /readyz ok after {:.1}s", ready.as_secs_f64());
    let admin = client(&l.admin_kubeconfig()).await?;
    bind_node_agent(&admin).await?;
    eprintln!("==> [3/5] kube-controller-manager and kube-scheduler");
    for d in [
        cp::controller_manager(l, &cm_bin),
        cp::scheduler(l, &sched_bin),
    ] {
        process::spawn(&l.pids(), &l.logs(), &d)?;
    }
    eprintln!("==> [4/5] node agent ({})", opts.config.display());
    let agent = process::Daemon {
        name: NODE_AGENT,
        program: &opts.agent_exe,
        args: vec![
            "run".into(),
            format!("--kubeconfig={}", l.kubeconfig("node-agent").display()),
            format!("--config={}", opts.config.display()),
            format!("--state-dir={}", l.root.display()),
        ],
    };
    process::spawn(&l.pids(), &l.logs(), &agent)?;
    eprintln!("==> [5/5] waiting for Ready nodes and the default ServiceAccount's token");
    wait_usable(l, &admin, nodes, Duration::from_secs(120)).await?;
    eprintln!(
        "==> cluster up in {:.1}s. kubectl: export KUBECONFIG={}",
        t0.elapsed().as_secs_f64(),
        l.admin_kubeconfig().display()
    );
    println!("{}", l.admin_kubeconfig().display());
    Ok(())
}

/// The agent's identity gets the kubelet's role, nothing more.
async fn bind_node_agent(admin: &Client) -> Result<()> {
    let crb = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some("redline:node-agent".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: "system:node".into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "User".into(),
            name: pki::NODE_AGENT.user.into(),
            ..Default::default()
        }]),
    };
    Api::<ClusterRoleBinding>::all(admin.clone())
        .patch(
            "redline:node-agent",
            &PatchParams::apply("redline-cluster").force(),
            &Patch::Apply(&crb),
        )
        .await?;
    Ok(())
}

async fn wait_usable(
    l: &Layout,
    admin: &Client,
    expected_nodes: usize,
    timeout: Duration,
) -> Result<()> {
    let start = Instant::now();
    let nodes: Api<Node> = Api::all(admin.clone());
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), "default");
    let mut last = String::new();
    loop {
        for d in DAEMONS {
            if process::running(&l.pids(), d).is_none() {
                bail!(
                    "{d} exited during startup; see {} ({})",
                    process::log_file(&l.logs(), d).display(),
                    process::describe(&l.pids(), d)
                );
            }
        }
        let ready = nodes
            .list(&ListParams::default())
            .await
            .map(|list| {
                list.items
                    .iter()
                    .filter(|n| node_ready(n) && !has_not_ready_taint(n))
                    .count()
            })
            .unwrap_or(0);
        let token = sas
            .get_opt("default")
            .await
            .ok()
            .flatten()
            .is_some_and(|sa| sa.secrets.is_some_and(|s| !s.is_empty()));
        let now = format!(
            "{ready} node(s) Ready, default token {}",
            if token { "ok" } else { "pending" }
        );
        if now != last {
            eprintln!("    after {:.1}s: {now}", start.elapsed().as_secs_f64());
            last = now.clone();
        }
        if token && ready >= expected_nodes {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("cluster not usable after {timeout:?}: {now}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn has_not_ready_taint(n: &Node) -> bool {
    n.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| {
            t.iter()
                .any(|t| t.key.starts_with("node.kubernetes.io/not-ready"))
        })
}

/// Stops what `up` started (in reverse), then removes leftover namespaces, the bridge and the
/// mount points the agent created on the host.
pub async fn down(l: &Layout, verbose: bool) -> Result<()> {
    for d in DAEMONS.iter().rev() {
        // The agent stops every pod within its grace period (capped at 10 s) first.
        let grace = if *d == NODE_AGENT { 40 } else { 15 };
        if process::stop(&l.pids(), d, Duration::from_secs(grace))? && verbose {
            eprintln!("    stopped {d}");
        }
    }
    for r in crate::agent::network::remove_leftovers() {
        eprintln!("    removed leftover {r}");
    }
    if let Ok(text) = std::fs::read_to_string(l.created_dirs()) {
        let mut dirs: Vec<&str> = text.lines().collect();
        // Deepest first, so parents become empty.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.len()));
        dirs.dedup();
        for d in dirs {
            let p = Path::new(d);
            let _ = if p.is_dir() {
                std::fs::remove_dir(p)
            } else {
                std::fs::remove_file(p)
            };
        }
        let _ = std::fs::remove_file(l.created_dirs());
    }
    // Processes whose flags name our state directory are ours even when their pid file is lost
    // (a crashed `up`): stop them too, then check that nothing is left.
    let strays = stray_processes(l);
    for (pid, cmd) in &strays {
        eprintln!("    stopping stray {pid}: {cmd}");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stray_processes(l).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (pid, _) in stray_processes(l) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    if !strays.is_empty() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        crate::agent::network::remove_leftovers();
    }
    let stray = leftovers(l);
    if !stray.is_empty() {
        bail!("left behind after down:\n  {}", stray.join("\n  "));
    }
    Ok(())
}

/// Anything of ours still on the machine: processes naming the state directory (every daemon
/// does in its flags) or running as pod helpers, our network namespaces and bridge, mounts
/// under the state directory, mount points we created.
pub fn leftovers(l: &Layout) -> Vec<String> {
    let mut found: Vec<String> = stray_processes(l)
        .into_iter()
        .map(|(pid, cmd)| format!("process {pid}: {cmd}"))
        .collect();
    let root = l.root.display().to_string();
    if let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.starts_with(crate::layout::NETNS_PREFIX) {
                found.push(format!("network namespace {line}"));
            }
        }
    }
    if Path::new("/sys/class/net")
        .join(crate::layout::BRIDGE_NAME)
        .exists()
    {
        found.push(format!("bridge {}", crate::layout::BRIDGE_NAME));
    }
    if let Ok(m) = std::fs::read_to_string("/proc/self/mountinfo") {
        for line in m.lines().filter(|l| l.contains(&root)) {
            found.push(format!("mount {line}"));
        }
    }
    if l.created_dirs().exists() {
        found.push(format!(
            "mount points listed in {}",
            l.created_dirs().display()
        ));
    }
    found
}

/// Live processes whose command line names the state directory, or pod helpers.
fn stray_processes(l: &Layout) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let root = l.root.display().to_string();
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let zombie = std::fs::read_to_string(entry.path().join("stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                == Some("Z")
        });
        if !zombie && (cmd.contains(&root) || cmd.contains("exec-in-pod")) {
            found.push((pid, cmd.trim().to_string()));
        }
    }
    found
}

/// Stops the API server, waits `down`, starts it with the same flags and waits for `/readyz`.
/// Returns the time from stop to ready.
pub async fn restart_apiserver(l: &Layout, down: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    if !process::stop(&l.pids(), cp::APISERVER, Duration::from_secs(5))? {
        bail!("kube-apiserver is not running (is the cluster up?)");
    }
    tokio::time::sleep(down).await;
    let bin = crate::layout::k8s_bin_dir().join(cp::APISERVER);
    process::spawn(&l.pids(), &l.logs(), &cp::apiserver(l, &bin))?;
    cp::wait_readyz(l, Duration::from_secs(60)).await?;
    Ok(t0.elapsed())
}

pub async fn status(l: &Layout) -> Result<bool> {
    let mut all = true;
    for d in DAEMONS {
        match process::running(&l.pids(), d) {
            Some(pid) => println!("{d:<24} running (pid {pid})"),
            None => {
                all = false;
                println!("{d:<24} stopped")
            }
        }
    }
    if !all {
        return Ok(false);
    }
    let admin = client(&l.admin_kubeconfig()).await?;
    let nodes: Api<Node> = Api::all(admin.clone());
    for n in nodes.list(&ListParams::default()).await?.items {
        let gpus = n
            .status
            .as_ref()
            .and_then(|s| s.capacity.as_ref()?.get("nvidia.com/gpu").cloned())
            .map(|q| q.0)
            .unwrap_or_default();
        println!(
            "node {:<18} {} gpus={gpus}",
            n.metadata.name.clone().unwrap_or_default(),
            if node_ready(&n) { "Ready" } else { "NotReady" }
        );
    }
    println!("KUBECONFIG={}", l.admin_kubeconfig().display());
    Ok(true)
}
