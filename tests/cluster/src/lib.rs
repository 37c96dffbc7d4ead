//! redline's local test cluster: a real Kubernetes 1.20 control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, built from Debian's source) and a node agent of ours
//! that runs the pods bound to its nodes as local processes, each in its own network namespace.
//!
//! `redline-cluster up|down|status` is the entry point; `redline-node-agent` is the "process
//! kubelet"; `redline-testpod` is the small workload the cluster tests deploy.

pub mod agent;
pub mod cluster;
pub mod control_plane;
pub mod layout;
pub mod pki;
pub mod process;
pub mod testing;
