//! Pod networking: a host bridge, and per pod a network namespace with a veth into the bridge
//! and its own IP, so every pod can listen on the same port and reach the others by IP.
//! Done with iproute2 (`ip`), which every Debian machine has.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

use crate::layout::{bridge_ip, BRIDGE_NAME, NETNS_PREFIX, POD_CIDR_PREFIX};

/// A pod's network namespace.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub netns: String,
    pub ip: Ipv4Addr,
}

impl Sandbox {
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }
}

pub struct Network {
    addresses: Mutex<Addresses>,
}

/// Host parts (the last 16 bits) of the pod addresses in use, handed out in turn, as CNI's
/// host-local IPAM does: a pod that is going away may hold its namespace (and its address on
/// the bridge) for a moment after its sandbox is deleted, and a new pod given that address at
/// once would lose its traffic to it (seen: an operator pod unreachable, killed by its liveness
/// probe, right after a test's pods were torn down).
#[derive(Debug, Default)]
struct Addresses {
    used: BTreeSet<u16>,
    /// Where the next search starts: after the last address handed out.
    next: u16,
}

impl Addresses {
    /// .0.0 is the network, .0.1 the bridge, .255.255 broadcast.
    const FIRST: u16 = 2;

    fn take(&mut self) -> Option<u16> {
        let start = self.next.max(Self::FIRST);
        let host = (start..u16::MAX)
            .chain(Self::FIRST..start)
            .find(|h| !self.used.contains(h))?;
        self.used.insert(host);
        self.next = host.checked_add(1).unwrap_or(Self::FIRST);
        Some(host)
    }

    fn give_back(&mut self, host: u16) {
        self.used.remove(&host);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

impl Network {
    /// Creates the bridge (idempotent).
    pub fn setup() -> Result<Self> {
        if !link_exists(BRIDGE_NAME) {
            ip(&["link", "add", BRIDGE_NAME, "type", "bridge"])?;
            ip(&[
                "addr",
                "add",
                &format!("{}/16", bridge_ip()),
                "dev",
                BRIDGE_NAME,
            ])?;
        }
        ip(&["link", "set", BRIDGE_NAME, "up"])?;
        Ok(Self {
            addresses: Mutex::new(Addresses::default()),
        })
    }

    fn allocate_ip(&self) -> Result<Ipv4Addr> {
        let host = self
            .addresses
            .lock()
            .unwrap()
            .take()
            .context("pod network exhausted")?;
        let [a, b] = POD_CIDR_PREFIX;
        Ok(Ipv4Addr::new(a, b, (host >> 8) as u8, host as u8))
    }

    fn release_ip(&self, ip: Ipv4Addr) {
        let o = ip.octets();
        self.addresses
            .lock()
            .unwrap()
            .give_back(u16::from(o[2]) << 8 | u16::from(o[3]));
    }

    /// A fresh namespace for the pod `uid`, up, addressed, routed via the bridge.
    pub fn create_sandbox(&self, uid: &str) -> Result<Sandbox> {
        let short: String = uid.chars().filter(|c| *c != '-').take(12).collect();
        let netns = format!("{NETNS_PREFIX}{short}");
        let host_if = host_if(&netns);
        let peer_if = format!("rlp{short}");
        let addr = self.allocate_ip()?;
        let sb = Sandbox { netns, ip: addr };
        let made = (|| {
            ip(&["netns", "add", &sb.netns])?;
            ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
            ])?;
            ip(&["link", "set", &peer_if, "netns", &sb.netns])?;
            ip(&["link", "set", &host_if, "master", BRIDGE_NAME, "up"])?;
            let n = sb.netns.as_str();
            ip(&["-n", n, "link", "set", &peer_if, "name", "eth0"])?;
            ip(&["-n", n, "addr", "add", &format!("{addr}/16"), "dev", "eth0"])?;
            ip(&["-n", n, "link", "set", "eth0", "up"])?;
            ip(&["-n", n, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                n,
                "route",
                "add",
                "default",
                "via",
                &bridge_ip().to_string(),
            ])
        })();
        if let Err(e) = made {
            let _ = self.delete_sandbox(&sb);
            let _ = ip(&["link", "del", &host_if]);
            return Err(e);
        }
        Ok(sb)
    }

    /// Kills whatever still runs in the namespace, then deletes it (the veth pair goes with it).
    pub fn delete_sandbox(&self, sb: &Sandbox) -> Result<()> {
        kill_netns_processes(&sb.netns);
        // Off the bridge now, even if a dying process keeps the namespace a while longer
        // (deleting one end of the veth pair deletes both).
        let _ = ip(&["link", "del", &host_if(&sb.netns)]);
        let r = ip(&["netns", "del", &sb.netns]);
        self.release_ip(sb.ip);
        r
    }

    pub fn teardown(&self) {
        let _ = ip(&["link", "del", BRIDGE_NAME]);
    }
}

/// The bridge side of a pod's veth pair (its name is the namespace's suffix).
fn host_if(netns: &str) -> String {
    format!("rlh{}", netns.trim_start_matches(NETNS_PREFIX))
}

fn kill_netns_processes(netns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", netns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// For `down`: every namespace with our prefix and the bridge, whoever left them. Returns what
/// was removed.
pub fn remove_leftovers() -> Vec<String> {
    let mut removed = Vec::new();
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(NETNS_PREFIX) {
                kill_netns_processes(name);
                if ip(&["netns", "del", name]).is_ok() {
                    removed.push(format!("netns {name}"));
                }
            }
        }
    }
    if link_exists(BRIDGE_NAME) && ip(&["link", "del", BRIDGE_NAME]).is_ok() {
        removed.push(format!("bridge {BRIDGE_NAME}"));
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_address_is_not_handed_out_again_at_once() {
        let mut a = Addresses::default();
        let first: Vec<u16> = (0..3).map(|_| a.take().unwrap()).collect();
        assert_eq!(first, [2, 3, 4]);
        a.give_back(2);
        // The next pods get fresh addresses, not the one a dying pod may still hold.
        assert_eq!(a.take(), Some(5));
        assert_eq!(a.take(), Some(6));
        // Only once the range wraps around does 2 come back.
        a.next = u16::MAX - 1;
        assert_eq!(a.take(), Some(u16::MAX - 1));
        assert_eq!(a.take(), Some(2));
        assert_eq!(a.used.len(), 6);
    }

    #[test]
    fn the_bridge_side_is_named_for_the_namespace() {
        let netns = format!("{NETNS_PREFIX}0123456789ab");
        assert_eq!(host_if(&netns), "rlh0123456789ab");
    }
}
