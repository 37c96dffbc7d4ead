//! The four control-plane daemons and their flags: etcd (Debian's `etcd-server`) and the
//! kube-apiserver, kube-controller-manager and kube-scheduler built by `build-k8s.sh`.
//! Everything listens on 127.0.0.1 only.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::layout::{self, Layout, APISERVER_PORT, ETCD_CLIENT_PORT, ETCD_PEER_PORT};
use crate::process::Daemon;

pub const ETCD: &str = "etcd";
pub const APISERVER: &str = "kube-apiserver";
pub const CONTROLLER_MANAGER: &str = "kube-controller-manager";
pub const SCHEDULER: &str = "kube-scheduler";

pub fn apiserver_url() -> String {
    format!("https://127.0.0.1:{APISERVER_PORT}")
}

pub fn etcd<'a>(l: &Layout, etcd_bin: &'a Path) -> Daemon<'a> {
    let client = format!("http://127.0.0.1:{ETCD_CLIENT_PORT}");
    let peer = format!("http://127.0.0.1:{ETCD_PEER_PORT}");
    Daemon {
        name: ETCD,
        program: etcd_bin,
        args: vec![
            "--name=redline".into(),
            format!("--data-dir={}", l.etcd_data().display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=redline={peer}"),
            "--log-level=warn".into(),
        ],
    }
}

pub fn apiserver<'a>(l: &Layout, bin: &'a Path) -> Daemon<'a> {
    let pki = |f: &str| l.pki().join(f).display().to_string();
    Daemon {
        name: APISERVER,
        program: bin,
        args: vec![
            format!("--etcd-servers=http://127.0.0.1:{ETCD_CLIENT_PORT}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={APISERVER_PORT}"),
            "--insecure-port=0".into(),
            format!("--tls-cert-file={}", pki("apiserver.crt")),
            format!("--tls-private-key-file={}", pki("apiserver.key")),
            format!("--client-ca-file={}", pki("ca.crt")),
            "--authorization-mode=RBAC".into(),
            format!("--service-account-key-file={}", pki("sa.pub")),
            format!("--service-account-signing-key-file={}", pki("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            "--service-cluster-ip-range=10.0.0.0/16".into(),
            // No kube-proxy and one API server: nothing would consume the endpoints it writes.
            "--endpoint-reconciler-type=none".into(),
            "--allow-privileged=true".into(),
            "--v=1".into(),
        ],
    }
}

pub fn controller_manager<'a>(l: &Layout, bin: &'a Path) -> Daemon<'a> {
    let pki = |f: &str| l.pki().join(f).display().to_string();
    Daemon {
        name: CONTROLLER_MANAGER,
        program: bin,
        args: vec![
            format!(
                "--kubeconfig={}",
                l.kubeconfig("controller-manager").display()
            ),
            "--bind-address=127.0.0.1".into(),
            "--port=0".into(),
            "--secure-port=0".into(),
            "--leader-elect=false".into(),
            format!("--root-ca-file={}", pki("ca.crt")),
            format!("--service-account-private-key-file={}", pki("sa.key")),
            "--use-service-account-credentials=true".into(),
            // The agent renews node Leases every 10 s; these only matter if it stalls.
            "--node-monitor-grace-period=2m".into(),
            "--pod-eviction-timeout=5m".into(),
            "--v=1".into(),
        ],
    }
}

pub fn scheduler<'a>(l: &Layout, bin: &'a Path) -> Daemon<'a> {
    Daemon {
        name: SCHEDULER,
        program: bin,
        args: vec![
            format!("--kubeconfig={}", l.kubeconfig("scheduler").display()),
            "--bind-address=127.0.0.1".into(),
            "--port=0".into(),
            "--secure-port=0".into(),
            "--leader-elect=false".into(),
            "--v=1".into(),
        ],
    }
}

/// An HTTPS client that trusts the cluster CA and presents no certificate: `/readyz` is open
/// to anonymous users (the `system:public-info-viewer` role).
pub fn anonymous_client(l: &Layout) -> Result<reqwest::Client> {
    let ca = std::fs::read(l.pki().join("ca.crt"))?;
    Ok(reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
        .timeout(Duration::from_secs(2))
        .build()?)
}

/// Waits for the API server's `/readyz`, printing the checks still failing as progress.
pub async fn wait_readyz(l: &Layout, timeout: Duration) -> Result<Duration> {
    let client = anonymous_client(l)?;
    let start = Instant::now();
    let url = format!("{}/readyz?verbose", apiserver_url());
    let mut last = String::new();
    loop {
        match client.get(&url).send().await {
            Ok(r) if r.status().is_success() => return Ok(start.elapsed()),
            Ok(r) => {
                let body = r.text().await.unwrap_or_default();
                let failing: Vec<&str> = body
                    .lines()
                    .filter(|l| l.starts_with("[-]"))
                    .map(|l| l.trim_start_matches("[-]").split(' ').next().unwrap_or(l))
                    .collect();
                let now = format!("waiting on {}", failing.join(", "));
                if now != last {
                    eprintln!(
                        "    /readyz after {:.1}s: {now}",
                        start.elapsed().as_secs_f64()
                    );
                    last = now;
                }
            }
            Err(_) if start.elapsed() < Duration::from_secs(1) => {}
            Err(e) => {
                let now = format!("not answering ({})", e.without_url());
                if now != last {
                    eprintln!(
                        "    /readyz after {:.1}s: {now}",
                        start.elapsed().as_secs_f64()
                    );
                    last = now;
                }
            }
        }
        if start.elapsed() > timeout {
            bail!(
                "kube-apiserver not ready after {timeout:?}; see {}",
                crate::process::log_file(&l.logs(), APISERVER).display()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The built Kubernetes binaries; builds them (cached, ~10 min cold) if missing.
pub fn ensure_k8s_binaries() -> Result<std::path::PathBuf> {
    let bin = layout::k8s_bin_dir();
    if [APISERVER, CONTROLLER_MANAGER, SCHEDULER]
        .iter()
        .all(|b| bin.join(b).is_file())
    {
        return Ok(bin);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("build-k8s.sh");
    eprintln!(
        "==> building Kubernetes {} control plane from Debian's source (cached in {}; ~10 min once)",
        layout::K8S_VERSION,
        bin.display()
    );
    let status = std::process::Command::new("bash")
        .arg(&script)
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    Ok(bin)
}
