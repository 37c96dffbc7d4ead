//! The admin API, on its own listener (localhost by default): the live limits the sidecar's
//! guard and the operator move (`GET`/`PUT /admin/limits`) and the drain (`POST`/`DELETE
//! /admin/drain`: not ready at once, refusing new requests after the lame duck, `crate::drain`).
//! A SIGTERM drain cannot be lifted.

use crate::openai::ApiError;
use crate::prepare::parse;
use crate::responses::engine_failed;
use crate::scheduler::Limits;
use crate::server::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/admin/limits", get(get_limits).put(put_limits))
        .route("/admin/drain", post(drain).delete(undrain))
        .route("/health", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
}

async fn get_limits(State(st): State<Arc<AppState>>) -> Response {
    match st.loaded.get() {
        None => ApiError::invalid("the model is still loading", None)
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .into_response(),
        Some(l) => {
            let lim = l.engine.limits();
            let env = l.engine.shared.envelope;
            Json(json!({
                "max_num_seqs": lim.max_num_seqs,
                "max_batched_tokens": lim.max_batched_tokens,
                "max_kv_usage": lim.max_kv_usage,
                "ceiling": {"max_num_seqs": env.max_num_seqs, "max_batched_tokens": env.max_batched_tokens},
                "kv_blocks_total": env.num_blocks,
                "block_size": env.block_size,
                "kv_cache_dtype": env.kv_dtype,
                "draining": st.draining(),
            }))
            .into_response()
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsBody {
    max_num_seqs: u32,
    max_batched_tokens: u32,
    /// Absent: unchanged.
    #[serde(default)]
    max_kv_usage: Option<f64>,
}

async fn put_limits(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let b: LimitsBody = match parse(body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    if b.max_batched_tokens == 0 {
        return ApiError::invalid(
            "max_batched_tokens must be at least 1; to stop admission set max_num_seqs to 0 or POST /admin/drain",
            Some("max_batched_tokens"),
        )
        .into_response();
    }
    if b.max_kv_usage
        .is_some_and(|r| !redline_api::admission::valid_kv_share(r))
    {
        return ApiError::invalid(
            "max_kv_usage is the share of the KV pool admission may fill: in (0, 1]",
            Some("max_kv_usage"),
        )
        .into_response();
    }
    let Some(l) = st.loaded.get() else {
        return ApiError::invalid("the model is still loading", None)
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .into_response();
    };
    let want = Limits {
        max_num_seqs: b.max_num_seqs,
        max_batched_tokens: b.max_batched_tokens,
        max_kv_usage: b.max_kv_usage.unwrap_or(l.engine.limits().max_kv_usage),
    };
    match l.engine.set_limits(want) {
        Some(applied) => {
            st.metrics.set_limits(applied);
            let env = l.engine.shared.envelope;
            Json(json!({
                "max_num_seqs": applied.max_num_seqs,
                "max_batched_tokens": applied.max_batched_tokens,
                "max_kv_usage": applied.max_kv_usage,
                "clamped": applied != want,
                "ceiling": {"max_num_seqs": env.max_num_seqs, "max_batched_tokens": env.max_batched_tokens},
            }))
        }
        .into_response(),
        None => engine_failed("the engine stopped".into()).into_response(),
    }
}

async fn drain(State(st): State<Arc<AppState>>) -> Response {
    st.set_draining(true);
    let stats = st
        .loaded
        .get()
        .map(|l| l.engine.stats())
        .unwrap_or_default();
    let lame_duck = st.lame_duck_left().as_secs_f64();
    tracing::info!(
        running = stats.running,
        waiting = stats.waiting,
        lame_duck_seconds = lame_duck,
        "draining: not ready; admitting no new requests once the lame duck is over"
    );
    (
        StatusCode::ACCEPTED,
        Json(json!({
            "draining": true,
            "running": stats.running,
            "waiting": stats.waiting,
            "lame_duck_seconds_left": lame_duck,
        })),
    )
        .into_response()
}

/// Lifts an admin drain. A SIGTERM drain ends the process once empty: requests admitted again
/// would be cut at the grace period's end, so it stays.
async fn undrain(State(st): State<Arc<AppState>>) -> Response {
    if st.shutting_down() {
        return ApiError::invalid(
            "shutting down (SIGTERM): the drain ends with the process and cannot be cancelled",
            None,
        )
        .status(StatusCode::CONFLICT)
        .into_response();
    }
    st.set_draining(false);
    tracing::info!("drain cancelled: admitting requests again");
    Json(json!({"draining": false})).into_response()
}
