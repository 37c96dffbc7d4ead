//! Fakes for unit tests at the API server boundary.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::StreamExt;

/// Serves `app` on a free local port: the config of a client of it.
async fn serve(app: axum::Router) -> kube::Config {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    kube::Config::new(url.parse().unwrap())
}

/// A client of `app` served as by [`serve`].
async fn client_of(app: axum::Router) -> kube::Client {
    kube::Client::try_from(serve(app).await).unwrap()
}

/// The API server's answer to a path it does not serve.
fn not_found() -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    (
        axum::http::StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "NotFound", "code": 404
        })),
    )
}

/// An API server that answers 503 to everything (one starting, or overloaded), counting the
/// requests it got.
pub struct UnavailableApiServer {
    pub config: kube::Config,
    requests: Arc<AtomicUsize>,
}

impl UnavailableApiServer {
    pub async fn start() -> Self {
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let app = axum::Router::new().fallback(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async {
                (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    axum::Json(serde_json::json!({
                        "kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "message": "starting", "reason": "ServiceUnavailable", "code": 503
                    })),
                )
            }
        });
        Self {
            config: serve(app).await,
            requests,
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// kube's default client of an [`UnavailableApiServer`]: it retries each 503 with backoff for
/// minutes, which the operator's own deadlines must cut short whatever client they are given.
pub async fn unavailable_api_server() -> kube::Client {
    kube::Client::try_from(UnavailableApiServer::start().await.config).unwrap()
}

/// An API server that lists one pod, then fails every watch (after a second: a watch that
/// broke) with a 500, which kube's client does not retry.
pub async fn list_then_fail() -> kube::Client {
    pods_api_server(usize::MAX).await
}

/// An API server that lists one pod and fails its first watch (after a second) with a 500;
/// every later watch stays open and quiet, as on a cluster where nothing changes.
pub async fn one_failed_watch() -> kube::Client {
    pods_api_server(1).await
}

/// One pod to list; the first `failing` watches fail after a second, the rest stay quiet.
async fn pods_api_server(failing: usize) -> kube::Client {
    let watches = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/api/v1/pods",
        axum::routing::get(
            move |axum::extract::Query(q): axum::extract::Query<
                std::collections::HashMap<String, String>,
            >| async move {
                if q.get("watch").is_some_and(|w| w == "true") {
                    if watches.fetch_add(1, Ordering::SeqCst) >= failing {
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    return (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        axum::Json(serde_json::json!({
                            "kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "message": "etcd unavailable", "reason": "InternalError",
                            "code": 500
                        })),
                    );
                }
                (
                    axum::http::StatusCode::OK,
                    axum::Json(serde_json::json!({
                        "kind": "PodList", "apiVersion": "v1",
                        "metadata": {"resourceVersion": "7"},
                        "items": [{"metadata": {
                            "name": "p", "namespace": "n", "resourceVersion": "7",
                            "managedFields": [{"manager": "kubelet", "operation": "Update"}]
                        }}]
                    })),
                )
            },
        ),
    );
    client_of(app).await
}

/// An API server that takes every status PATCH of an InferenceService, answering with
/// `object`, and keeps each one's path and body; anything else is a 404.
pub async fn status_patches(
    object: serde_json::Value,
) -> (
    kube::Client,
    Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>,
) {
    let patches = Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = patches.clone();
    let app = axum::Router::new().fallback(
        move |method: axum::http::Method, uri: axum::http::Uri, body: axum::body::Bytes| {
            let (kept, object) = (kept.clone(), object.clone());
            async move {
                let path = uri.path().to_string();
                if method != axum::http::Method::PATCH || !path.ends_with("/status") {
                    return not_found();
                }
                let body = serde_json::from_slice(&body).unwrap_or_default();
                kept.lock().unwrap().push((path, body));
                (axum::http::StatusCode::OK, axum::Json(object))
            }
        },
    );
    (client_of(app).await, patches)
}

/// An API server with one AutoscalingPolicy ("shared" in "n", its scale-down window 42 s),
/// listed a second late, its watch quiet after; it counts the GETs of single policies and
/// answers everything else 404.
pub async fn policies_api_server() -> (kube::Client, Arc<AtomicUsize>) {
    let gets = Arc::new(AtomicUsize::new(0));
    let counted = gets.clone();
    let policy = serde_json::json!({
        "apiVersion": "redline.dev/v1alpha1", "kind": "AutoscalingPolicy",
        "metadata": {"name": "shared", "namespace": "n", "resourceVersion": "3"},
        "spec": {"scaleDownWindowSeconds": 42}
    });
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let (counted, policy) = (counted.clone(), policy.clone());
        async move {
            let ok = |v| (axum::http::StatusCode::OK, axum::Json(v));
            match uri.path() {
                "/apis/redline.dev/v1alpha1/autoscalingpolicies" => {
                    if uri.query().unwrap_or_default().contains("watch=true") {
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    ok(serde_json::json!({
                        "apiVersion": "redline.dev/v1alpha1",
                        "kind": "AutoscalingPolicyList",
                        "metadata": {"resourceVersion": "3"}, "items": [policy]
                    }))
                }
                "/apis/redline.dev/v1alpha1/namespaces/n/autoscalingpolicies/shared" => {
                    counted.fetch_add(1, Ordering::SeqCst);
                    ok(policy)
                }
                _ => not_found(),
            }
        }
    });
    (client_of(app).await, gets)
}

/// An API server whose InferenceServices list empty, whose first watch then sends `events`
/// (`(type, object)`, e.g. `("MODIFIED", ..)`) and stays open, and whose later watches stay
/// quiet.
pub async fn inference_service_watch(
    events: Vec<(&'static str, serde_json::Value)>,
) -> kube::Client {
    let watches = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let (watches, events) = (watches.clone(), events.clone());
        async move {
            use axum::response::IntoResponse;
            if uri.path() != "/apis/redline.dev/v1alpha1/inferenceservices" {
                return not_found().into_response();
            }
            if !uri.query().unwrap_or_default().contains("watch=true") {
                return axum::Json(serde_json::json!({
                    "apiVersion": "redline.dev/v1alpha1", "kind": "InferenceServiceList",
                    "metadata": {"resourceVersion": "1"}, "items": []
                }))
                .into_response();
            }
            if watches.fetch_add(1, Ordering::SeqCst) > 0 {
                std::future::pending::<()>().await;
            }
            let lines = events.into_iter().map(|(kind, object)| {
                let line = serde_json::json!({"type": kind, "object": object}).to_string() + "\n";
                Ok::<_, std::convert::Infallible>(line)
            });
            let body = futures::stream::iter(lines).chain(futures::stream::pending());
            axum::body::Body::from_stream(body).into_response()
        }
    });
    client_of(app).await
}

/// A sidecar's report of one pod at KV usage `usage` and pressure `level`, no drain, no late
/// requests.
pub fn report(usage: f64, level: redline_api::Level) -> redline_api::PressureReport {
    redline_api::PressureReport {
        device: Default::default(),
        engine: Some(redline_api::EngineReading::new(
            redline_api::EngineFlavor::Redline,
            usage,
        )),
        derived: redline_api::Derived {
            level,
            ..Default::default()
        },
        limits: redline_api::LimitsStatus {
            target: None,
            min_num_seqs: 1,
            min_batched_tokens: 64,
            guard_limits: None,
            guard_reason: None,
            guard: redline_api::GuardSettings::default(),
            drain: false,
        },
        sample_age_seconds: Some(0.1),
        engine_reachable: true,
    }
}
