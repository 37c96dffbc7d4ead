//! The workload the cluster tests deploy (like Kubernetes' agnhost): an HTTP server whose
//! readiness can be switched, that fetches from other pods, calls the API server with its
//! ServiceAccount token, kills itself on request, records events sent by other pods, and reports
//! its SIGTERM to `$TERM_REPORT_URL` before it exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use serde::Deserialize;

const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Start not ready (until POST /ready?value=true).
    #[arg(long)]
    start_unready: bool,
}

#[derive(Default)]
struct App {
    ready: AtomicBool,
    records: Mutex<Vec<String>>,
}

#[derive(Deserialize)]
struct Flag {
    value: bool,
}

#[derive(Deserialize)]
struct Url {
    url: String,
}

#[derive(Deserialize)]
struct KubePath {
    path: String,
}

fn name() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| std::env::var("HOSTNAME").unwrap_or_default())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let app = Arc::new(App::default());
    app.ready.store(!args.start_unready, Ordering::SeqCst);
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/ready",
            get(|State(a): State<Arc<App>>| async move {
                if a.ready.load(Ordering::SeqCst) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            })
            .post(
                |State(a): State<Arc<App>>, Query(f): Query<Flag>| async move {
                    a.ready.store(f.value, Ordering::SeqCst);
                    "ok"
                },
            ),
        )
        .route("/whoami", get(|| async { name() }))
        .route(
            "/env/{key}",
            get(|Path(k): Path<String>| async move {
                std::env::var(&k).map_err(|_| (StatusCode::NOT_FOUND, format!("{k} unset")))
            }),
        )
        .route("/fetch", get(fetch))
        .route("/kube", get(kube))
        .route(
            "/kill",
            post(|| async {
                // Dies as a killed process does (not an orderly exit).
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                "unreachable"
            }),
        )
        .route(
            "/records",
            get(|State(a): State<Arc<App>>| async move { Json(a.records.lock().unwrap().clone()) })
                .post(|State(a): State<Arc<App>>, body: String| async move {
                    a.records.lock().unwrap().push(body);
                    "ok"
                }),
        )
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", args.port)).await?;
    eprintln!("testpod {} listening on :{}", name(), args.port);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = axum::serve(listener, router) => r?,
        _ = term.recv() => {
            eprintln!("testpod {}: SIGTERM", name());
            if let Ok(url) = std::env::var("TERM_REPORT_URL") {
                let body = format!("{} SIGTERM", name());
                let r = reqwest::Client::new().post(&url).body(body).timeout(Duration::from_secs(5)).send().await;
                eprintln!("reported SIGTERM to {url}: {:?}", r.map(|r| r.status()));
            }
            // Shutting down takes a moment, as a real server's drain would.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(())
}

async fn fetch(Query(u): Query<Url>) -> Result<String, (StatusCode, String)> {
    let r = reqwest::Client::new()
        .get(&u.url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?;
    r.text()
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))
}

/// Calls the API server as in-cluster clients do; answers the API server's status code.
async fn kube(Query(p): Query<KubePath>) -> Result<Json<serde_json::Value>, (StatusCode, String)> {
    let r = async {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").context("KUBERNETES_SERVICE_HOST")?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").context("KUBERNETES_SERVICE_PORT")?;
        let token =
            std::fs::read_to_string(format!("{SA_DIR}/token")).context("reading the token")?;
        let ca = std::fs::read(format!("{SA_DIR}/ca.crt")).context("reading ca.crt")?;
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
            .build()?;
        let resp = client
            .get(format!("https://{host}:{port}{}", p.path))
            .bearer_auth(token.trim())
            .send()
            .await?;
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        anyhow::Ok(serde_json::json!({ "status": status, "body": body }))
    }
    .await;
    r.map(Json)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))
}
