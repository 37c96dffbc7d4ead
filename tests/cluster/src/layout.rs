//! Where the cluster keeps its state, and the fixed addresses everything agrees on.

use std::path::{Path, PathBuf};

/// Kubernetes version of the control plane (Debian bookworm's source package).
pub const K8S_VERSION: &str = "1.20.2";
/// The API server's secure port on 127.0.0.1.
pub const APISERVER_PORT: u16 = 6443;
/// etcd's client and peer ports on 127.0.0.1 (not the defaults, so a system etcd does not clash).
pub const ETCD_CLIENT_PORT: u16 = 12379;
pub const ETCD_PEER_PORT: u16 = 12380;
/// The pod network: a host bridge holding `.0.1`, pods get the following addresses.
pub const BRIDGE_NAME: &str = "rlbr0";
pub const POD_CIDR_PREFIX: [u8; 2] = [10, 88];
pub const BRIDGE_IP: [u8; 4] = [10, 88, 0, 1];
/// Prefix of every network namespace the agent creates (so `down` can find leftovers).
pub const NETNS_PREFIX: &str = "rl-";

/// The cluster's state directory (PKI, kubeconfigs, etcd data, logs, pid files, pods).
/// `$REDLINE_CLUSTER_DIR`, default `/tmp/redline-cluster`.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn from_env() -> Self {
        let root = std::env::var_os("REDLINE_CLUSTER_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/redline-cluster"));
        Self { root }
    }
    pub fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn pids(&self) -> PathBuf {
        self.root.join("pids")
    }
    pub fn etcd_data(&self) -> PathBuf {
        self.root.join("etcd")
    }
    pub fn pods(&self) -> PathBuf {
        self.root.join("pods")
    }
    /// The admin kubeconfig `up` writes (what `KUBECONFIG` should point at).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.root.join("admin.kubeconfig")
    }
    pub fn kubeconfig(&self, user: &str) -> PathBuf {
        self.root.join(format!("{user}.kubeconfig"))
    }
    /// Mount-point directories the agent had to create on the host; `down` removes them.
    pub fn created_dirs(&self) -> PathBuf {
        self.root.join("created-dirs")
    }
}

/// The cache of built Kubernetes binaries, keyed by version (what `build-k8s.sh` fills).
pub fn k8s_bin_dir() -> PathBuf {
    cache_root()
        .join(format!("kubernetes-{K8S_VERSION}"))
        .join("bin")
}

fn cache_root() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"))
        .join("redline")
}

pub fn bridge_ip() -> std::net::Ipv4Addr {
    BRIDGE_IP.into()
}
