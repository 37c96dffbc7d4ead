//! Fakes for unit tests at the API server boundary.

/// A client of an API server that answers 503 to everything (one starting, or overloaded):
/// kube's client retries such answers with backoff for minutes.
pub async fn unavailable_api_server() -> kube::Client {
    let app = axum::Router::new().fallback(|| async {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "starting", "reason": "ServiceUnavailable", "code": 503
            })),
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
}
