//! Real engine and sidecar processes for the sidecar's tests and its overhead bench.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redline_api::PressureReport;
use serde_json::Value;

pub const TOKEN: &str = "s3cret-test-token";

/// Two distinct free localhost ports: both listeners are held while the second is picked, so
/// the OS cannot hand out the same port twice.
pub fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// How many times a process is started on new ports when its port was taken meanwhile.
const PORT_TRIES: usize = 5;

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

/// How a started process ended its wait.
#[derive(PartialEq)]
pub enum Started {
    Up,
    /// It exited because its port was taken between picking and binding (by another process's
    /// outgoing connection, say): start it again on new ports.
    PortTaken,
}

/// Waits until `url` answers 2xx. A process that exits first fails the test at once with its
/// log, except when its address was in use.
pub async fn wait_http(url: &str, what: &str, child: &mut Child, log: &Path, secs: u64) -> Started {
    let c = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Ok(r) = c.get(url).send().await {
            if r.status().is_success() {
                return Started::Up;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains("Address already in use") {
                return Started::PortTaken;
            }
            panic!("{what} exited ({status}) before {url} answered:\n{text}");
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
        for _ in 0..PORT_TRIES {
            let (port, admin_port) = free_ports();
            let mut e = Engine {
                child: Command::new("true").spawn().unwrap(),
                port,
                admin_port,
                args: args.iter().map(|s| s.to_string()).collect(),
                name: name.to_owned(),
            };
            if e.try_spawn().await == Started::Up {
                return e;
            }
        }
        panic!("no free ports for the engine after {PORT_TRIES} tries");
    }

    /// Starts the engine again on its ports (after `kill`).
    pub async fn spawn(&mut self) {
        assert!(
            self.try_spawn().await == Started::Up,
            "the engine's port was taken while it was down"
        );
    }

    async fn try_spawn(&mut self) -> Started {
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
        let url = self.url("/ready");
        wait_http(&url, "engine", &mut self.child, &path, 120).await
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
    /// Its stderr: the log.
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// A sidecar for `engine`; `extra` flags may name another `--engine-admin-url`.
    pub async fn start(name: &str, engine: &Engine, extra: &[&str]) -> Sidecar {
        let admin = engine.admin();
        let admin_flag: &[&str] = if extra.contains(&"--engine-admin-url") {
            &[]
        } else {
            &["--engine-admin-url", &admin]
        };
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
        for _ in 0..PORT_TRIES {
            let (port, _) = free_ports();
            let (log, path) = log_file(&format!("sidecar-{name}"));
            let mut child = Command::new(env!("CARGO_BIN_EXE_redline-sidecar"))
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--engine-url", &engine.url("")])
                .args(admin_flag)
                .args(["--device", "auto"])
                .arg("--token-file")
                .arg(&token)
                .args(extra)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start redline-sidecar");
            let base = format!("http://127.0.0.1:{port}");
            let health = format!("{base}/health");
            if wait_http(&health, "sidecar", &mut child, &path, 30).await == Started::Up {
                return Sidecar {
                    child,
                    base,
                    log: path,
                    _dir: dir,
                };
            }
        }
        panic!("no free port for the sidecar after {PORT_TRIES} tries");
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

    /// `PUT /v1/limits` with the operator's token, as the operator sends it; must be taken.
    pub async fn put_limits(&self, body: Value) {
        let r = reqwest::Client::new()
            .put(format!("{}/v1/limits", self.base))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
