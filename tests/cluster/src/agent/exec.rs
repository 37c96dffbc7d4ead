//! Starting a container's process inside its pod: the agent re-executes itself as
//! `redline-node-agent exec-in-pod ...`, a single-threaded helper that joins the pod's network
//! namespace, makes a private mount namespace with the pod's volumes bound where the container
//! expects them (the ServiceAccount token at /var/run/secrets/kubernetes.io/serviceaccount among
//! them), applies the securityContext, and then execs the program. Mount namespaces can only be
//! unshared by a single-threaded process, hence a helper and not a `pre_exec` in the agent.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use nix::mount::{mount, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::unistd::{chdir, setgid, setgroups, sethostname, setuid, Gid, Uid};

/// A bind mount: `src` on this machine appears at `dst` inside the pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Bind {
    pub src: PathBuf,
    pub dst: PathBuf,
    pub read_only: bool,
}

impl std::str::FromStr for Bind {
    type Err = String;
    /// `src:dst[:ro]`
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            [src, dst] => Ok(Bind {
                src: src.into(),
                dst: dst.into(),
                read_only: false,
            }),
            [src, dst, "ro"] => Ok(Bind {
                src: src.into(),
                dst: dst.into(),
                read_only: true,
            }),
            _ => Err(format!("bind {s:?} is not src:dst[:ro]")),
        }
    }
}

impl std::fmt::Display for Bind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.src.display(), self.dst.display())?;
        if self.read_only {
            write!(f, ":ro")?;
        }
        Ok(())
    }
}

/// Arguments of the `exec-in-pod` helper. The environment it is started with is the container's.
#[derive(Debug, Args)]
pub struct ExecInPod {
    #[arg(long)]
    pub netns: PathBuf,
    #[arg(long)]
    pub hostname: String,
    #[arg(long = "bind")]
    pub binds: Vec<Bind>,
    #[arg(long)]
    pub read_only_root: bool,
    #[arg(long)]
    pub uid: Option<u32>,
    #[arg(long)]
    pub gid: Option<u32>,
    #[arg(long, default_value = "/")]
    pub workdir: PathBuf,
    pub program: PathBuf,
    #[arg(allow_hyphen_values = true, trailing_var_arg = true)]
    pub args: Vec<OsString>,
}

impl ExecInPod {
    /// The helper's command line, after the agent's own executable.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["exec-in-pod".into()];
        a.push(format!("--netns={}", self.netns.display()).into());
        a.push(format!("--hostname={}", self.hostname).into());
        for b in &self.binds {
            a.push(format!("--bind={b}").into());
        }
        if self.read_only_root {
            a.push("--read-only-root".into());
        }
        if let Some(u) = self.uid {
            a.push(format!("--uid={u}").into());
        }
        if let Some(g) = self.gid {
            a.push(format!("--gid={g}").into());
        }
        a.push(format!("--workdir={}", self.workdir.display()).into());
        a.push("--".into());
        a.push(self.program.clone().into());
        a.extend(self.args.iter().cloned());
        a
    }

    /// Runs in the helper process; returns only on error (exec replaces the process).
    pub fn run(self) -> Result<std::convert::Infallible> {
        // If the agent dies, so do its containers (the pid-1-of-a-container analogue).
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
        let ns = std::fs::File::open(&self.netns)
            .with_context(|| format!("opening {}", self.netns.display()))?;
        setns(ns, CloneFlags::CLONE_NEWNET).context("joining the pod's network namespace")?;
        unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS)
            .context("unsharing mount and UTS namespaces")?;
        sethostname(&self.hostname)?;
        // Nothing mounted here may propagate back to the host.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .context("making / private")?;
        for b in &self.binds {
            mount(
                Some(&b.src),
                &b.dst,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .with_context(|| format!("bind-mounting {b}"))?;
            if b.read_only {
                mount(
                    None::<&str>,
                    &b.dst,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                )
                .with_context(|| format!("making {} read-only", b.dst.display()))?;
            }
        }
        if self.read_only_root {
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .context("making the root filesystem read-only")?;
        }
        chdir(&self.workdir).with_context(|| format!("chdir {}", self.workdir.display()))?;
        if let Some(g) = self.gid.or(self.uid) {
            setgroups(&[]).context("dropping supplementary groups")?;
            setgid(Gid::from_raw(g)).context("setgid")?;
        }
        if let Some(u) = self.uid {
            setuid(Uid::from_raw(u)).context("setuid")?;
        }
        let err = std::process::Command::new(&self.program)
            .args(&self.args)
            .exec();
        Err(err).with_context(|| format!("exec {}", self.program.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_round_trip() {
        for s in ["/a/b:/c", "/a:/var/run/secrets/x:ro"] {
            let b: Bind = s.parse().unwrap();
            assert_eq!(b.to_string(), s);
        }
        assert!("/a".parse::<Bind>().is_err());
        assert!("/a:/b:rw".parse::<Bind>().is_err());
    }
}
