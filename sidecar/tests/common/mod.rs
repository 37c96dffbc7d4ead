//! Real engine and sidecar processes for the sidecar's tests and its overhead bench.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redline_api::PressureReport;
use serde_json::Value;

pub const TOKEN: &str = "s3cret-test-token";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `redline-engine` of this build. Cargo builds only this package's binaries for its tests,
/// so build the engine's here; test executables live in target/<profile>/deps. Built for the
/// whole workspace, it resolves the features every other build uses and is a no-op after any of
/// them (scripts/test builds every binary first); `-p redline-engine` would resolve its own and
/// recompile candle-core and up (4m44s on 2 cores, measured).
pub fn engine_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap().to_owned();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--quiet", "--workspace", "--bin", "redline-engine"]);
    if dir.ends_with("release") {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .expect("running cargo build for redline-engine");
    assert!(status.success(), "cargo build --bin redline-engine failed");
    dir.join("redline-engine")
}

pub fn log_file(name: &str) -> (std::fs::File, PathBuf) {
    let path = std::env::temp_dir().join(format!("redline-sidecar-test-{name}.log"));
    (std::fs::File::create(&path).unwrap(), path)
}

pub async fn wait_http(url: &str, what: &str, log: &Path, secs: u64) {
    let c = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Ok(r) = c.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{what} not up at {url} after {secs} s; see {}",
        log.display()
    );
}

/// A real engine on fixed ports (so it can be restarted in place), killed on drop.
pub struct Engine {
    pub child: Child,
    pub port: u16,
    admin_port: u16,
    args: Vec<String>,
    name: String,
}

impl Engine {
    pub async fn start(name: &str, args: &[&str]) -> Engine {
        let mut e = Engine {
            child: Command::new("true").spawn().unwrap(),
            port: free_port(),
            admin_port: free_port(),
            args: args.iter().map(|s| s.to_string()).collect(),
            name: name.to_owned(),
        };
        e.spawn().await;
        e
    }

    pub async fn spawn(&mut self) {
        let (log, path) = log_file(&format!("engine-{}", self.name));
        self.child = Command::new(engine_bin())
            .args(["serve", "--host", "127.0.0.1", "--threads", "2"])
            .args(["--port", &self.port.to_string()])
            .args(["--admin-port", &self.admin_port.to_string()])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start redline-engine");
        wait_http(&self.url("/ready"), "engine", &path, 120).await;
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn admin(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    pub async fn metrics(&self) -> String {
        get_text(&self.url("/metrics")).await
    }

    pub async fn limits(&self) -> Value {
        reqwest::get(format!("{}/admin/limits", self.admin()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn get_text(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// The sum of a gauge's or counter's samples (over label sets) in a `/metrics` page.
pub fn metric(text: &str, name: &str) -> f64 {
    redline_api::prom::Exposition::parse(text)
        .expect("the metrics parse")
        .sum(name)
        .unwrap_or_else(|| panic!("no metric {name}"))
}

pub struct Sidecar {
    pub child: Child,
    pub base: String,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    pub async fn start(name: &str, engine: &Engine, extra: &[&str]) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
        let port = free_port();
        let (log, path) = log_file(&format!("sidecar-{name}"));
        let child = Command::new(env!("CARGO_BIN_EXE_redline-sidecar"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--engine-url", &engine.url("")])
            .args(["--engine-admin-url", &engine.admin()])
            .args(["--device", "auto"])
            .arg("--token-file")
            .arg(&token)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start redline-sidecar");
        let base = format!("http://127.0.0.1:{port}");
        wait_http(&format!("{base}/health"), "sidecar", &path, 30).await;
        Sidecar {
            child,
            base,
            _dir: dir,
        }
    }

    pub async fn pressure(&self) -> PressureReport {
        let r = reqwest::Client::new()
            .get(format!("{}/v1/pressure", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    pub async fn metrics(&self) -> String {
        get_text(&format!("{}/metrics", self.base)).await
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
