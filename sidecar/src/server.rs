//! The sidecar's HTTP API: `GET /v1/pressure` and `PUT /v1/limits` behind the bearer token from
//! the mounted Secret, `GET /metrics` and `GET /health` open (no secrets in them).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use redline_api::LimitsRequest;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::sidecar::Shared;

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": {"message": msg.into()}}))).into_response()
}

/// The token as the Secret holds it now (re-read per request, so a rotated Secret applies at
/// once). `None` when the file cannot be read: then every request is refused.
fn expected_token(shared: &Shared) -> Option<Vec<u8>> {
    let t = std::fs::read(&shared.token_file).ok()?;
    let t = t.trim_ascii().to_vec();
    (!t.is_empty()).then_some(t)
}

async fn auth(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().as_bytes().to_vec());
    let ok = match (given, expected_token(&shared)) {
        (Some(g), Some(want)) => bool::from(g.ct_eq(&want)),
        _ => false,
    };
    if !ok {
        shared.metrics.unauthorized.inc();
        let mut r = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, "Bearer".parse().unwrap());
        return r;
    }
    next.run(req).await
}

async fn pressure(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.report()).into_response()
}

/// Checks what serde cannot: ranges and consistency.
pub fn validate(r: &LimitsRequest) -> Result<(), String> {
    if r.max_batched_tokens == 0 {
        return Err("max_batched_tokens must be at least 1 (drain with max_num_seqs: 0)".into());
    }
    if let Some(g) = &r.guard {
        if !(g.horizon_seconds.is_finite() && g.horizon_seconds > 0.0) {
            return Err("guard.horizon_seconds must be a positive number".into());
        }
        if !redline_api::admission::valid_kv_share(g.redline_ratio) {
            return Err("guard.redline_ratio must be in (0, 1]".into());
        }
    }
    Ok(())
}

async fn limits(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    // The path names the offending field (`max_num_seqs: invalid value ...`).
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let r: LimitsRequest = match serde_path_to_error::deserialize(de) {
        Ok(r) => r,
        Err(e) => {
            let path = e.path().to_string();
            let at = if path == "." {
                String::new()
            } else {
                format!("{path}: ")
            };
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid limits body: {at}{}", e.inner()),
            );
        }
    };
    if let Err(e) = validate(&r) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    Json(shared.set_limits(r)).into_response()
}

pub fn router(shared: Arc<Shared>) -> Router {
    let private = Router::new()
        .route("/v1/pressure", get(pressure))
        .route("/v1/limits", put(limits))
        .route_layer(middleware::from_fn_with_state(shared.clone(), auth));
    let m = shared.clone();
    Router::new()
        .route("/metrics", get(move || async move { m.metrics.render() }))
        .route("/health", get(|| async { "ok" }))
        .merge(private)
        .with_state(shared)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redline_api::GuardSettings;

    #[test]
    fn validation_names_the_field() {
        let mut r = LimitsRequest {
            max_num_seqs: 4,
            max_batched_tokens: 0,
            min_num_seqs: None,
            min_batched_tokens: None,
            guard: None,
            drain: false,
        };
        assert!(validate(&r).unwrap_err().contains("max_batched_tokens"));
        r.max_batched_tokens = 64;
        r.guard = Some(GuardSettings {
            redline_ratio: 1.5,
            ..Default::default()
        });
        assert!(validate(&r).unwrap_err().contains("redline_ratio"));
        r.guard = Some(GuardSettings::default());
        assert!(validate(&r).is_ok());
    }
}
