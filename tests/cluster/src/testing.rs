//! Helpers for tests that run on a cluster (this crate's and the operator's): the cluster from
//! `$KUBECONFIG` when set, otherwise the local one (`redline-cluster up`, idempotent); a
//! namespace per test; waiting with a deadline that reports what was last seen; HTTP to pods
//! through the API server's pod proxy (works where the test host cannot route to pod IPs).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};

/// `$KUBECONFIG`, or the local cluster's admin kubeconfig after `redline-cluster up`.
pub fn kubeconfig_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Ok(k) = std::env::var("KUBECONFIG") {
            return k;
        }
        let bin = redline_cluster_bin();
        let out = std::process::Command::new(&bin)
            .arg("up")
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "running {} up: {e} (cargo build --workspace --bins first)",
                    bin.display()
                )
            });
        assert!(out.status.success(), "redline-cluster up failed");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

/// Whether the tests run on the local cluster (which they may restart parts of), not on a
/// cluster `$KUBECONFIG` names.
pub fn is_local_cluster() -> bool {
    std::path::Path::new(kubeconfig_path()) == crate::layout::Layout::from_env().admin_kubeconfig()
}

/// `redline-cluster` of this build: test executables live in target/<profile>/deps, the
/// binaries one level up.
fn redline_cluster_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("redline-cluster")
}

/// Runs `redline-cluster` with `args`.
pub fn redline_cluster(args: &[&str]) {
    let bin = redline_cluster_bin();
    let status = std::process::Command::new(&bin)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    assert!(status.success(), "redline-cluster {args:?} failed");
}

/// The repository's root.
pub fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A real `helm`: `$REDLINE_HELM`, or the one `scripts/fetch-helm.sh` fetches and caches.
pub fn helm() -> String {
    if let Ok(h) = std::env::var("REDLINE_HELM") {
        return h;
    }
    let out = std::process::Command::new(repo().join("scripts/fetch-helm.sh"))
        .output()
        .expect("fetch-helm.sh");
    assert!(
        out.status.success(),
        "fetch-helm.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A real `kubectl`: `$REDLINE_KUBECTL`, or the one that comes with the fetched helm.
pub fn kubectl() -> String {
    std::env::var("REDLINE_KUBECTL").unwrap_or_else(|_| {
        std::path::Path::new(&helm())
            .with_file_name("kubectl")
            .to_string_lossy()
            .into_owned()
    })
}

/// Runs `bin` (helm, kubectl) against the test cluster; panics with its output when it fails.
fn run_tool(bin: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(bin)
        .args(args)
        .env("KUBECONFIG", kubeconfig_path())
        .output()
        .unwrap_or_else(|e| panic!("running {bin}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{bin} {args:?} failed:\n{text}");
    text
}

pub fn run_helm(args: &[&str]) -> String {
    run_tool(&helm(), args)
}

pub fn run_kubectl(args: &[&str]) -> String {
    run_tool(&kubectl(), args)
}

/// `helm upgrade --install` of the chart into `namespace`, then waits for the operator's pod
/// to be Ready and returns it.
pub async fn install_operator(client: &Client, namespace: &str) -> Pod {
    run_helm(&[
        "upgrade",
        "--install",
        "redline",
        repo().join("charts/redline").to_str().unwrap(),
        "--namespace",
        namespace,
        "--create-namespace",
        "--wait",
        "--timeout",
        "120s",
    ]);
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    wait_for(
        "the operator pod Ready",
        Duration::from_secs(60),
        || async {
            let list = pods
                .list(
                    &kube::api::ListParams::default()
                        .labels("app.kubernetes.io/name=redline-operator"),
                )
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .into_iter()
                .find(is_ready)
                .ok_or("no ready operator pod".to_string())
        },
    )
    .await
}

pub async fn client() -> Client {
    crate::cluster::client(std::path::Path::new(kubeconfig_path()))
        .await
        .expect("a client from the kubeconfig")
}

/// A client that returns a 429 or 503 as the server gave it. kube retries them by default with
/// backoff, so an eviction a PodDisruptionBudget refuses would be tried again until a
/// replacement pod is ready and it goes through.
pub async fn client_without_retries() -> Client {
    let mut config = crate::cluster::config(std::path::Path::new(kubeconfig_path()))
        .await
        .expect("a config from the kubeconfig");
    config.default_retry = false;
    Client::try_from(config).expect("a client")
}

/// A namespace of its own per test, deleted at the end (also when the test fails).
pub struct TestNs {
    pub name: String,
}

impl TestNs {
    pub async fn new(client: &Client, prefix: &str) -> Self {
        let name = format!("{prefix}-{}", std::process::id() % 100_000);
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("creating the test namespace");
        Self { name }
    }
    pub fn pods(&self, client: &Client) -> Api<Pod> {
        Api::namespaced(client.clone(), &self.name)
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let n = self.name.clone();
        // Drop cannot await, and the test's client is served by the test's (now blocked)
        // runtime: delete from a fresh runtime with a fresh client.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                let _ = Api::<Namespace>::all(client().await)
                    .delete(&n, &DeleteParams::default())
                    .await;
            })
        })
        .join();
    }
}

/// Polls `probe` until it returns Some; panics with `what` and the last observation's debug
/// text after `timeout`.
pub async fn wait_for<T, S: std::fmt::Debug, F, Fut>(
    what: &str,
    timeout: Duration,
    mut probe: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, S>>,
{
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < timeout {
        match probe().await {
            Ok(v) => return v,
            Err(s) => last = Some(s),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("not {what} after {timeout:?}; last seen: {last:#?}");
}

pub fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// An HTTP request to `pod`'s `port` through the API server's pod proxy.
pub async fn pod_http(
    client: &Client,
    ns: &str,
    pod: &str,
    port: u16,
    method: &str,
    path_and_query: &str,
    body: Option<serde_json::Value>,
) -> Result<String, String> {
    let uri = format!("/api/v1/namespaces/{ns}/pods/{pod}:{port}/proxy{path_and_query}");
    let mut req = http::Request::builder().method(method).uri(uri);
    let bytes = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            serde_json::to_vec(&b).unwrap()
        }
        None => Vec::new(),
    };
    client
        .request_text(req.body(bytes).unwrap())
        .await
        .map_err(|e| e.to_string())
}

/// Prints the last lines of every container log of the pods in `namespace` whose names start
/// with `pod_prefix` when dropped during a panic: a failed cluster test then shows what the
/// component under test said. Local cluster only (the agent keeps logs as files).
pub struct LogsOnPanic {
    pub namespace: String,
    pub pod_prefix: String,
}

impl LogsOnPanic {
    /// The operator's logs (in `operator_ns`) and every pod's in the test's namespace `ns`.
    /// Declare the pair after the [`TestNs`], so it is dropped (and printed) before the
    /// namespace goes.
    pub fn operator_and(operator_ns: &str, ns: &str) -> [LogsOnPanic; 2] {
        [
            LogsOnPanic {
                namespace: operator_ns.into(),
                pod_prefix: "redline-operator".into(),
            },
            LogsOnPanic {
                namespace: ns.into(),
                pod_prefix: String::new(),
            },
        ]
    }
}

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() || !is_local_cluster() {
            return;
        }
        let pods = crate::layout::Layout::from_env().pods();
        let prefix = format!("{}_{}", self.namespace, self.pod_prefix);
        let Ok(dirs) = std::fs::read_dir(&pods) else {
            return;
        };
        for dir in dirs.flatten() {
            if !dir.file_name().to_string_lossy().starts_with(&prefix) {
                continue;
            }
            for f in std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let path = f.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = &lines[lines.len().saturating_sub(80)..];
                    eprintln!("---- {} (last {} lines)", path.display(), tail.len());
                    for l in tail {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}

/// A pod's pressure sidecar, reached at the pod IP with the operator's token, as the operator
/// reaches it (the local cluster only: the host routes to pod IPs, and through the pod proxy
/// the Authorization header would be the API server's). Tests use it to leave what an
/// operator leaves behind.
pub struct Sidecar {
    url: String,
    token: String,
    http: reqwest::Client,
}

impl Sidecar {
    /// `pod`'s sidecar on `port`, with the token in the Secret `token_secret` of the pod's namespace.
    pub async fn at(client: &Client, pod: &Pod, token_secret: &str, port: u16) -> Sidecar {
        let ns = pod.metadata.namespace.clone().expect("a namespaced pod");
        let secret = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns)
            .get(token_secret)
            .await
            .expect("the sidecar token Secret");
        let token = secret
            .data
            .and_then(|mut d| d.remove("token"))
            .expect("a token in the Secret");
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .expect("a pod IP");
        Sidecar {
            url: format!("http://{ip}:{port}"),
            token: String::from_utf8(token.0).expect("a UTF-8 token"),
            http: reqwest::Client::new(),
        }
    }

    /// `GET /v1/pressure`.
    pub async fn pressure(&self) -> Result<serde_json::Value, String> {
        self.http
            .get(format!("{}/v1/pressure", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())
    }

    /// Whether the sidecar holds its engine drained (`limits.drain` in its report).
    pub async fn draining(&self) -> Result<bool, String> {
        let r = self.pressure().await?;
        r["limits"]["drain"]
            .as_bool()
            .ok_or_else(|| format!("no limits.drain in {r}"))
    }

    /// `PUT /v1/limits` with the limits and guard it holds now and `drain`: what an operator's
    /// drain (or its cancellation) sends.
    pub async fn set_drain(&self, drain: bool) {
        let r = self.pressure().await.expect("a pressure report");
        let target = &r["limits"]["target"];
        let body = serde_json::json!({
            "max_num_seqs": target["max_num_seqs"],
            "max_batched_tokens": target["max_batched_tokens"],
            "guard": r["limits"]["guard"],
            "drain": drain,
        });
        self.http
            .put(format!("{}/v1/limits", self.url))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("the sidecar took the limits");
    }
}

/// SIGKILLs the process that runs `program` in pod `pod`, as a crash would; the node agent
/// then restarts its container by the pod's `restartPolicy`. Local cluster only: its pods are
/// processes on this host, and each carries `HOSTNAME=<pod>` in its environment, as a
/// kubelet's containers do. Panics unless exactly one such process runs.
pub fn crash_in_pod(pod: &str, program: &str) {
    assert!(
        is_local_cluster(),
        "pods are host processes only on the local cluster"
    );
    let hostname = format!("HOSTNAME={pod}");
    let matches: Vec<i32> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let read = |f: &str| std::fs::read(format!("/proc/{pid}/{f}")).unwrap_or_default();
            let cmdline = read("cmdline");
            let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
            let runs = argv0.rsplit(|&b| b == b'/').next() == Some(program.as_bytes());
            runs && read("environ")
                .split(|&b| b == 0)
                .any(|kv| kv == hostname.as_bytes())
        })
        .collect();
    assert_eq!(
        matches.len(),
        1,
        "{program} processes in pod {pod}: {matches:?}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(matches[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL");
}
