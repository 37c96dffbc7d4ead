//! CPU pods: memory from the pod's cgroup (v2 `memory.current`/`memory.max`/`memory.pressure`,
//! v1 `memory.usage_in_bytes`/`memory.limit_in_bytes` as a fallback) and CPU utilization from
//! `cpu.stat`. An unlimited cgroup's total is the machine's memory.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use redline_api::DeviceReading;

use super::{Device, DeviceError};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Version {
    V2,
    V1,
}

pub struct CgroupDevice {
    dir: PathBuf,
    version: Version,
    meminfo: PathBuf,
    cpus: f64,
    /// The previous CPU usage sample, for utilization as a rate.
    last_cpu: Mutex<Option<(Instant, u64)>>,
}

impl CgroupDevice {
    /// The cgroup this process is in, under /sys/fs/cgroup.
    pub fn for_this_process() -> Result<Self, DeviceError> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| DeviceError::NoCgroup(format!("/proc/self/cgroup: {e}")))?;
        Self::from_proc(
            Path::new("/sys/fs/cgroup"),
            &own,
            Path::new("/proc/meminfo"),
        )
    }

    /// `proc_cgroup` is the text of /proc/self/cgroup; `root` the cgroup mount (tests point it at
    /// a directory of their own).
    pub fn from_proc(root: &Path, proc_cgroup: &str, meminfo: &Path) -> Result<Self, DeviceError> {
        let cpus = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
        let make = |dir: PathBuf, version| Self {
            dir,
            version,
            meminfo: meminfo.to_owned(),
            cpus,
            last_cpu: Mutex::new(None),
        };
        for line in proc_cgroup.lines() {
            // v2: "0::/path"; v1: "N:controller,list:/path".
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let rel = path.trim_start_matches('/');
            if id == "0" && ctrls.is_empty() {
                let dir = root.join(rel);
                if dir.join("memory.current").exists() {
                    return Ok(make(dir, Version::V2));
                }
                // A container's cgroup namespace shows "/": the mount is its own cgroup.
                if root.join("memory.current").exists() {
                    return Ok(make(root.to_owned(), Version::V2));
                }
            } else if ctrls.split(',').any(|c| c == "memory") {
                for dir in [root.join("memory").join(rel), root.join("memory")] {
                    if dir.join("memory.usage_in_bytes").exists() {
                        return Ok(make(dir, Version::V1));
                    }
                }
            }
        }
        Err(DeviceError::NoCgroup(format!(
            "no memory.current or memory.usage_in_bytes under {}",
            root.display()
        )))
    }

    fn file(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(name)).ok()
    }

    fn number(&self, name: &str) -> Option<u64> {
        self.file(name)?.trim().parse().ok()
    }

    fn machine_memory(&self) -> Option<u64> {
        let text = std::fs::read_to_string(&self.meminfo).ok()?;
        let kib: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }

    /// CPU seconds used by the cgroup, in microseconds.
    fn cpu_usage_usec(&self) -> Option<u64> {
        match self.version {
            Version::V2 => self
                .file("cpu.stat")?
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))?
                .trim()
                .parse()
                .ok(),
            // v1's cpuacct lives in another hierarchy; not worth a second lookup for a hint.
            Version::V1 => None,
        }
    }

    fn utilization(&self) -> Option<f64> {
        let usage = self.cpu_usage_usec()?;
        let now = Instant::now();
        let mut last = self.last_cpu.lock().unwrap();
        let prev = last.replace((now, usage));
        let (t0, u0) = prev?;
        let secs = now.duration_since(t0).as_secs_f64();
        (secs > 0.0).then(|| ((usage.saturating_sub(u0)) as f64 / 1e6 / secs / self.cpus).min(1.0))
    }
}

/// "some avg10=1.23 avg60=... total=..." -> 1.23
fn psi_some_avg10(text: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix("some "))?
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("avg10="))?
        .parse()
        .ok()
}

impl Device for CgroupDevice {
    fn read(&self) -> DeviceReading {
        let (used, limit) = match self.version {
            Version::V2 => (
                self.number("memory.current"),
                // "max" (unlimited) does not parse: the machine's memory is the limit then.
                self.number("memory.max"),
            ),
            Version::V1 => (
                self.number("memory.usage_in_bytes"),
                // v1 says "unlimited" with a huge number.
                self.number("memory.limit_in_bytes")
                    .filter(|l| *l < (1 << 62)),
            ),
        };
        let machine = self.machine_memory();
        let total = match (limit, machine) {
            (Some(l), Some(m)) => Some(l.min(m)),
            (l, m) => l.or(m),
        };
        DeviceReading {
            backend: "cgroup".into(),
            name: Some(self.dir.display().to_string()),
            memory_used_bytes: used,
            memory_total_bytes: total,
            utilization_ratio: self.utilization(),
            memory_stall_percent: self
                .file("memory.pressure")
                .and_then(|t| psi_some_avg10(&t)),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn meminfo(dir: &Path) -> PathBuf {
        write(dir, "meminfo", "MemTotal:       1000 kB\nMemFree: 1 kB\n");
        dir.join("meminfo")
    }

    #[test]
    fn v2_reads_current_max_and_psi() {
        let t = tempfile::tempdir().unwrap();
        let cg = t.path().join("cg");
        let pod = cg.join("kubepods/pod1");
        write(&pod, "memory.current", "4096\n");
        write(&pod, "memory.max", "8192\n");
        write(
            &pod,
            "memory.pressure",
            "some avg10=1.50 avg60=0.10 avg300=0.00 total=5\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        );
        write(&pod, "cpu.stat", "usage_usec 100\n");
        let d = CgroupDevice::from_proc(&cg, "0::/kubepods/pod1\n", &meminfo(t.path())).unwrap();
        let r = d.read();
        assert_eq!(r.backend, "cgroup");
        assert_eq!(r.memory_used_bytes, Some(4096));
        assert_eq!(r.memory_total_bytes, Some(8192));
        assert_eq!(r.memory_stall_percent, Some(1.5));
        assert_eq!(r.utilization_ratio, None, "a rate needs two samples");
        write(&pod, "cpu.stat", "usage_usec 200\n");
        assert!(d.read().utilization_ratio.is_some());
    }

    #[test]
    fn v2_unlimited_is_the_machine_and_v1_is_a_fallback() {
        let t = tempfile::tempdir().unwrap();
        let cg = t.path().join("cg");
        write(&cg, "memory.current", "10\n");
        write(&cg, "memory.max", "max\n");
        let mi = meminfo(t.path());
        // A container's cgroup namespace: "0::/" and the files at the mount.
        let d = CgroupDevice::from_proc(&cg, "0::/\n", &mi).unwrap();
        assert_eq!(d.read().memory_total_bytes, Some(1000 * 1024));

        let v1 = t.path().join("v1");
        write(
            &v1.join("memory/docker/abc"),
            "memory.usage_in_bytes",
            "300\n",
        );
        write(
            &v1.join("memory/docker/abc"),
            "memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        let d = CgroupDevice::from_proc(
            &v1,
            "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n",
            &mi,
        )
        .unwrap();
        let r = d.read();
        assert_eq!(r.memory_used_bytes, Some(300));
        assert_eq!(r.memory_total_bytes, Some(1000 * 1024));
    }

    #[test]
    fn no_memory_controller_is_a_clear_error() {
        let t = tempfile::tempdir().unwrap();
        let e = CgroupDevice::from_proc(t.path(), "0::/x\n", &meminfo(t.path()))
            .err()
            .unwrap();
        assert!(e.to_string().contains("no cgroup memory controller"), "{e}");
    }
}
