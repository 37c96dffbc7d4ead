//! The agent's nodes in the API: registered with their capacity (`nvidia.com/gpu` included),
//! kept Ready by renewing their Leases in kube-node-lease every 10 s and their status
//! heartbeat every 30 s, as a kubelet does.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource};
use tracing::warn;

use super::config::NodeConfig;

const MANAGER: &str = "redline-node-agent";
pub const LEASE_SECONDS: i32 = 40;

fn node_object(n: &NodeConfig) -> Node {
    let mut labels: BTreeMap<String, String> = [
        ("kubernetes.io/hostname", n.name.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
        ("redline.dev/node-agent", "local"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if n.gpus > 0 {
        labels.insert("nvidia.com/gpu.present".into(), "true".into());
    }
    labels.extend(n.labels.clone());
    Node {
        metadata: ObjectMeta {
            name: Some(n.name.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn node_status(n: &NodeConfig, host_ip: &str, now: Timestamp) -> NodeStatus {
    let mut capacity: BTreeMap<String, Quantity> = [
        ("cpu", n.cpu.clone()),
        ("memory", n.memory.clone()),
        ("pods", n.pods.to_string()),
        ("ephemeral-storage", "100Gi".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), Quantity(v)))
    .collect();
    capacity.insert("nvidia.com/gpu".into(), Quantity(n.gpus.to_string()));
    let cond = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: None,
    };
    NodeStatus {
        allocatable: Some(capacity.clone()),
        capacity: Some(capacity),
        conditions: Some(vec![
            cond(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "agent has sufficient memory",
            ),
            cond(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "agent has no disk pressure",
            ),
            cond(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "agent has sufficient PID available",
            ),
            cond(
                "Ready",
                "True",
                "KubeletReady",
                "redline node agent is posting ready status",
            ),
        ]),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: host_ip.into(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: n.name.clone(),
            },
        ]),
        node_info: Some(NodeSystemInfo {
            architecture: "amd64".into(),
            operating_system: "linux".into(),
            container_runtime_version: "redline-local://0.1.0".into(),
            kubelet_version: "v1.20.2".into(),
            kube_proxy_version: "v1.20.2".into(),
            kernel_version: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .into(),
            os_image: "redline local node".into(),
            machine_id: n.name.clone(),
            system_uuid: n.name.clone(),
            boot_id: n.name.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates or updates the node and its status.
pub async fn register(client: &Client, n: &NodeConfig, host_ip: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let pp = PatchParams::apply(MANAGER).force();
    nodes
        .patch(&n.name, &pp, &Patch::Apply(&node_object(n)))
        .await?;
    heartbeat_status(client, n, host_ip).await
}

async fn heartbeat_status(client: &Client, n: &NodeConfig, host_ip: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    // Conditions are a merge-by-type list: a strategic merge patch keeps transition times.
    let patch = serde_json::json!({ "status": node_status(n, host_ip, Timestamp::now()) });
    nodes
        .patch_status(&n.name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await?;
    Ok(())
}

async fn renew_lease(client: &Client, n: &NodeConfig) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let node: Api<Node> = Api::all(client.clone());
    let owner = node.get(&n.name).await?;
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(n.name.clone()),
            namespace: Some("kube-node-lease".into()),
            owner_references: Some(vec![OwnerReference {
                api_version: Node::api_version(&()).into(),
                kind: Node::kind(&()).into(),
                name: n.name.clone(),
                uid: owner.metadata.uid.unwrap_or_default(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(n.name.clone()),
            lease_duration_seconds: Some(LEASE_SECONDS),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        }),
    };
    leases
        .patch(
            &n.name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await?;
    Ok(())
}

/// Keeps every node alive until the task is dropped. Errors (an API server restart) are logged
/// once per streak and retried on the next tick.
pub async fn heartbeat(client: Client, nodes: Vec<NodeConfig>, host_ip: String) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    let mut n_tick: u64 = 0;
    let mut failing = false;
    loop {
        tick.tick().await;
        n_tick += 1;
        let mut ok = true;
        for n in &nodes {
            let mut r = renew_lease(&client, n).await;
            if r.is_ok() && n_tick.is_multiple_of(3) {
                r = heartbeat_status(&client, n, &host_ip).await;
            }
            if let Err(e) = r {
                ok = false;
                if !failing {
                    warn!(node = %n.name, "heartbeat failed (retrying every 10 s): {e:#}");
                }
            }
        }
        failing = !ok;
    }
}
