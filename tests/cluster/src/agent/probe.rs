//! Container probes as a kubelet runs them: httpGet (2xx/3xx is success) and tcpSocket against
//! the pod's IP, with the probe's timeout. exec and grpc probes are not supported and fail with
//! a message that says so.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Timing of a probe, with Kubernetes' defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Timing {
    pub fn of(p: &Probe) -> Self {
        let secs = |v: Option<i32>, d: i32| Duration::from_secs(v.unwrap_or(d).max(0) as u64);
        Self {
            initial_delay: secs(p.initial_delay_seconds, 0),
            period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
            failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
        }
    }
}

/// Consecutive-result counting: the probe's verdict flips after `threshold` agreeing results.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub ok: bool,
    successes: u32,
    failures: u32,
}

impl Verdict {
    pub fn new(initially_ok: bool) -> Self {
        Self {
            ok: initially_ok,
            successes: 0,
            failures: 0,
        }
    }
    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// Records one result; returns true if the verdict changed.
    pub fn record(&mut self, success: bool, t: &Timing) -> bool {
        if success {
            self.successes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.successes = 0;
        }
        let before = self.ok;
        if success && self.successes >= t.success_threshold {
            self.ok = true;
        }
        if !success && self.failures >= t.failure_threshold {
            self.ok = false;
        }
        before != self.ok
    }
}

fn resolve_port(port: &IntOrString, c: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).map_err(|_| format!("port {p} out of range")),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("no container port named {name:?}")),
    }
}

/// Runs the probe once against `pod_ip`; Err carries the failure message.
pub async fn run(
    p: &Probe,
    c: &Container,
    pod_ip: &str,
    http: &reqwest::Client,
) -> Result<(), String> {
    let timeout = Timing::of(p).timeout;
    if let Some(h) = &p.http_get {
        let port = resolve_port(&h.port, c)?;
        if h.scheme.as_deref().is_some_and(|s| s != "HTTP") {
            return Err(format!("httpGet scheme {:?} is not supported", h.scheme));
        }
        let host = h.host.as_deref().unwrap_or(pod_ip);
        let path = h.path.as_deref().unwrap_or("/");
        let url = format!("http://{host}:{port}{path}");
        let mut req = http.get(&url).timeout(timeout);
        for hdr in h.http_headers.iter().flatten() {
            req = req.header(&hdr.name, &hdr.value);
        }
        match req.send().await {
            Ok(r) if r.status().is_success() || r.status().is_redirection() => Ok(()),
            Ok(r) => Err(format!(
                "HTTP probe failed with statuscode: {}",
                r.status().as_u16()
            )),
            Err(e) => Err(format!("Get {url}: {e}")),
        }
    } else if let Some(t) = &p.tcp_socket {
        let port = resolve_port(&t.port, c)?;
        let host = t.host.as_deref().unwrap_or(pod_ip);
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("dial tcp {host}:{port}: {e}")),
            Err(_) => Err(format!("dial tcp {host}:{port}: timeout")),
        }
    } else {
        Err("exec and grpc probes are not supported by the local node agent".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        let p: Probe =
            serde_json::from_str(r#"{"failureThreshold": 2, "successThreshold": 2}"#).unwrap();
        let t = Timing::of(&p);
        assert_eq!(t.period, Duration::from_secs(10));
        let mut v = Verdict::new(false);
        assert!(!v.record(true, &t));
        assert!(v.record(true, &t), "two successes flip to ok");
        assert!(!v.record(false, &t));
        assert!(!v.record(true, &t), "a success resets the failure count");
        assert!(!v.record(false, &t));
        assert!(v.record(false, &t));
        assert!(!v.ok);
    }
}
