//! The HTTP server as clients meet it: a real `redline-engine serve` process on the real
//! default model, real HTTP. Bad input gets an OpenAI-shaped 4xx and costs nobody else;
//! a client that disconnects frees its blocks at once; live limits, drain and SIGTERM do
//! what the admin contract says; metrics carry redline's and vLLM's names.

mod common;

use common::Server;
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// Streams a completion and returns its text, the number of content chunks, and whether it
/// ended with `[DONE]`.
async fn stream_text(base: &str, body: Value) -> (String, usize, bool, Option<String>) {
    let r = client()
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let mut bytes = r.bytes_stream();
    let (mut buf, mut text, mut chunks, mut done, mut finish) =
        (String::new(), String::new(), 0, false, None);
    while let Some(b) = bytes.next().await {
        buf.push_str(std::str::from_utf8(&b.unwrap()).unwrap());
        while let Some(i) = buf.find("\n\n") {
            let ev: String = buf.drain(..i + 2).collect();
            let data = ev.trim().strip_prefix("data: ").unwrap_or("").to_string();
            if data == "[DONE]" {
                done = true;
            } else if !data.is_empty() {
                let v: Value = serde_json::from_str(&data).unwrap();
                if let Some(c) = v["choices"].get(0) {
                    text.push_str(c["text"].as_str().unwrap_or(""));
                    chunks += 1;
                    if let Some(f) = c["finish_reason"].as_str() {
                        finish = Some(f.to_string());
                    }
                }
            }
        }
    }
    (text, chunks, done, finish)
}

fn good_request(max_tokens: u32) -> Value {
    json!({"prompt": "Once upon a time, in a small village by the sea,", "max_tokens": max_tokens,
           "temperature": 0, "stream": true, "ignore_eos": true})
}

/// A JSON array of strings.
fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect()
}

/// `body` with `extra`'s fields added (or replaced).
fn with(mut body: Value, extra: Value) -> Value {
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

/// The smallest valid request to `path` (one token), with `extra`'s fields added.
fn minimal(path: &str, extra: Value) -> Value {
    let body = if path.ends_with("/chat/completions") {
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    } else {
        json!({"prompt": "hi", "max_tokens": 1})
    };
    with(body, extra)
}

async fn expect_error(
    s: &Server,
    path: &str,
    body: reqwest::Body,
    status: u16,
    code: Option<&str>,
) -> Value {
    let r = client()
        .post(s.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        status,
        "status for a bad request to {path}"
    );
    let v: Value = r.json().await.expect("error body is JSON");
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error message in {v}"
    );
    assert!(e["type"].is_string(), "error type in {v}");
    if let Some(c) = code {
        assert_eq!(e["code"], c, "error code in {v}");
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_a_concurrent_stream_is_unchanged() {
    let s = Server::start(&[]).await;
    // The reference: the same greedy stream on an otherwise idle server.
    let (alone, _, _, _) = stream_text(&s.base, good_request(48)).await;

    let base = s.base.clone();
    let good = tokio::spawn(async move { stream_text(&base, good_request(48)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let long: Vec<u32> = (0..9000).map(|i| 100 + i % 1000).collect();
    let huge = format!("{{\"prompt\": \"{}\"}}", "a".repeat(5 << 20));
    let (c, cc) = ("/v1/completions", "/v1/chat/completions");
    let mut cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        (c, "{\"prompt\": \"hi\", ".into(), 400, None), // malformed JSON
        (
            c,
            json!({"prompt": "hi", "max_tokens": "ten"}).to_string(),
            400,
            None,
        ), // wrong type
        (cc, json!({"messages": "hello"}).to_string(), 400, None),
        (cc, json!({"messages": []}).to_string(), 400, None),
        (
            c,
            json!({"model": "gpt-9", "prompt": "hi"}).to_string(),
            404,
            Some("model_not_found"),
        ),
        (
            c,
            json!({"prompt": "hi", "max_tokens": 0}).to_string(),
            400,
            None,
        ),
        (
            c,
            json!({"prompt": "hi", "max_tokens": 9000}).to_string(),
            400,
            Some("context_length_exceeded"),
        ),
        (
            c,
            json!({"prompt": long, "max_tokens": 1}).to_string(),
            400,
            Some("context_length_exceeded"),
        ),
        (
            c,
            json!({"prompt": [4_000_000_000u32], "max_tokens": 1}).to_string(),
            400,
            None,
        ),
        (
            c,
            json!({"prompt": "hi", "temperature": 7}).to_string(),
            400,
            None,
        ),
        (c, json!({"prompt": "hi", "n": 17}).to_string(), 400, None),
        (c, json!({"prompt": "hi", "n": 0}).to_string(), 400, None),
        (c, huge, 413, None), // oversized body
    ];
    // Sampling parameters out of their ranges...
    for bad in [
        json!({"presence_penalty": 2.5}),
        json!({"frequency_penalty": -3}),
        json!({"top_k": -2}),
        json!({"min_p": 1.5}),
        json!({"repetition_penalty": 0}),
        json!({"logit_bias": {"99999999": 5}}),
        json!({"logit_bias": {"17": 101}}),
        json!({"logprobs": 21}),
        json!({"logprobs": true}),
    ] {
        cases.push((c, minimal(c, bad).to_string(), 400, None));
    }
    for bad in [
        json!({"top_logprobs": 3}),
        json!({"logprobs": true, "top_logprobs": 21}),
        json!({"logprobs": 2}),
    ] {
        cases.push((cc, minimal(cc, bad).to_string(), 400, None));
    }
    for (path, unsupported) in [
        (cc, json!({"echo": true})),
        (c, json!({"best_of": 3})),
        (c, json!({"suffix": "end"})),
        (
            cc,
            json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
        ),
        (cc, json!({"response_format": {"type": "json_object"}})),
    ] {
        let body = minimal(path, unsupported).to_string();
        cases.push((path, body, 400, Some("unsupported_parameter")));
    }
    for (path, body, status, code) in cases {
        let v = expect_error(&s, path, body.clone().into(), status, code).await;
        if code == Some("unsupported_parameter") {
            let param = v["error"]["param"].as_str().unwrap().to_string();
            assert!(body.contains(&format!("\"{param}\"")), "{v} for {body}");
        }
    }
    // What the defaults mean, sent out loud, is no error.
    for (path, off) in [
        (
            c,
            json!({"logprobs": null, "echo": false, "best_of": 1, "suffix": ""}),
        ),
        (
            cc,
            json!({"logprobs": false, "top_logprobs": 0, "tools": [], "response_format": {"type": "text"}}),
        ),
    ] {
        let body = minimal(path, off);
        let r = client().post(s.url(path)).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200, "{body}");
    }
    let r = client().get(s.url("/v1/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    let (text, chunks, done, finish) = good.await.unwrap();
    assert!(done, "stream must end with [DONE]");
    assert_eq!(finish.as_deref(), Some("length"));
    assert!(
        chunks > 10,
        "tokens arrive as separate chunks, got {chunks}"
    );
    assert_eq!(
        text, alone,
        "the concurrent good stream must be unchanged by the bad requests"
    );
    s.wait_metric("redline_engine_requests_running", 10, |v| v == 0.0)
        .await;
    s.wait_metric("redline_engine_kv_blocks_used", 10, |v| v == 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_frees_its_sequence_and_blocks_at_once() {
    let s = Server::start(&[]).await;
    let r = client()
        .post(s.url("/v1/completions"))
        .json(&good_request(2000))
        .send()
        .await
        .unwrap();
    let mut bytes = r.bytes_stream();
    for _ in 0..3 {
        bytes.next().await.unwrap().unwrap();
    }
    assert!(s.metric("redline_engine_kv_blocks_used").await > 0.0);
    assert_eq!(s.metric("redline_engine_requests_running").await, 1.0);
    drop(bytes);
    // Freed at the next step boundary; generous bound for a loaded CI machine.
    s.wait_metric("redline_engine_kv_blocks_used", 10, |v| v == 0.0)
        .await;
    assert_eq!(s.metric("redline_engine_requests_running").await, 0.0);
    // The server is still healthy and serves the next request.
    let (_, _, done, _) = stream_text(&s.base, good_request(4)).await;
    assert!(done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_admission_beside_a_running_request_crosses_the_kv_line() {
    // 16 blocks of 16 tokens; at a line of 0.5 an admission beside others may leave 7 in use.
    let s = Server::start(&["--num-blocks", "16", "--block-size", "16"]).await;
    let c = client();
    let limits = format!("{}/admin/limits", s.admin);
    for bad in [0.0, -0.5, 1.5] {
        let r = c
            .put(&limits)
            .json(&json!({"max_num_seqs": 8, "max_batched_tokens": 256, "max_kv_usage": bad}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], "max_kv_usage", "{e}");
    }
    assert_eq!(s.metric("redline_engine_max_kv_usage").await, 1.0);
    let put = |body: Value| {
        let (c, limits) = (c.clone(), limits.clone());
        async move {
            let r = c.put(&limits).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let r = put(json!({"max_num_seqs": 8, "max_batched_tokens": 256, "max_kv_usage": 0.5})).await;
    assert_eq!(r["max_kv_usage"], 0.5, "{r}");
    assert_eq!(s.metric("redline_engine_max_kv_usage").await, 0.5);

    // A lone request may go past the line; once it holds 7 blocks, a second (one block of
    // prompt) would leave 8: it waits.
    let base = s.base.clone();
    // Its whole life (200 tokens and the prompt) is 14 blocks: with the second's 2, the pool.
    let long = tokio::spawn(async move { stream_text(&base, good_request(200)).await });
    s.wait_metric("redline_engine_kv_blocks_used", 60, |v| v >= 7.0)
        .await;
    let base = s.base.clone();
    let short = tokio::spawn(async move { stream_text(&base, good_request(8)).await });
    s.wait_metric("redline_engine_requests_waiting", 30, |v| v == 1.0)
        .await;
    // Limits without a line keep the one set.
    let r = put(json!({"max_num_seqs": 8, "max_batched_tokens": 256})).await;
    assert_eq!(r["max_kv_usage"], 0.5, "{r}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.metric("redline_engine_requests_waiting").await,
        1.0,
        "admitted past the line"
    );
    let l: Value = c.get(&limits).send().await.unwrap().json().await.unwrap();
    assert_eq!(l["max_kv_usage"], 0.5, "{l}");

    // At 1.0 only the watermark is left (15 of 16): it joins the running one.
    put(json!({"max_num_seqs": 8, "max_batched_tokens": 256, "max_kv_usage": 1.0})).await;
    s.wait_metric("redline_engine_requests_waiting", 30, |v| v == 0.0)
        .await;
    assert!(
        !long.is_finished(),
        "the second must be admitted beside the first, not after it"
    );
    for r in [short.await.unwrap(), long.await.unwrap()] {
        assert_eq!((r.2, r.3.as_deref()), (true, Some("length")));
    }
    assert_eq!(s.metric("redline_engine_preemptions_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_limits_gate_admission_without_evicting_and_drain_finishes_in_flight_work() {
    let s = Server::start(&["--max-num-seqs-ceiling", "8"]).await;
    let c = client();
    let admin = |p: &str| format!("{}{p}", s.admin);
    let l: Value = c
        .get(admin("/admin/limits"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(l["max_num_seqs"], 8);
    assert_eq!(l["ceiling"]["max_num_seqs"], 8);

    // Malformed and out-of-range limit updates are refused with a reason.
    for bad in [
        json!({"max_num_seqs": "x", "max_batched_tokens": 1}),
        json!({"max_num_seqs": 1}),
        json!({"max_num_seqs": 1, "max_batched_tokens": 0}),
        json!({"max_num_seqs": 1, "max_batched_tokens": 64, "extra": 1}),
    ] {
        let r = c
            .put(admin("/admin/limits"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
    // Above the ceiling is clamped into the envelope, and says so (with the envelope).
    let r: Value = c
        .put(admin("/admin/limits"))
        .json(&json!({"max_num_seqs": 99, "max_batched_tokens": 128}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (r["max_num_seqs"].as_u64(), r["clamped"].as_bool()),
        (Some(8), Some(true))
    );
    assert_eq!(r["ceiling"]["max_num_seqs"], 8, "{r}");

    // Three running, then the limit drops to 1: nobody is evicted, a fourth request waits.
    let spawn = |n| {
        let base = s.base.clone();
        tokio::spawn(async move { stream_text(&base, good_request(n)).await })
    };
    let first: Vec<_> = (0..3).map(|_| spawn(160)).collect();
    s.wait_metric("redline_engine_requests_running", 30, |v| v == 3.0)
        .await;
    c.put(admin("/admin/limits"))
        .json(&json!({"max_num_seqs": 1, "max_batched_tokens": 128}))
        .send()
        .await
        .unwrap();
    assert_eq!(s.metric("redline_engine_max_num_seqs").await, 1.0);
    let late = spawn(8);
    s.wait_metric("redline_engine_requests_waiting", 30, |v| v == 1.0)
        .await;
    assert_eq!(
        s.metric("redline_engine_requests_running").await,
        3.0,
        "lowering the limit evicts nobody"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        s.metric("redline_engine_requests_waiting").await,
        1.0,
        "admission stays stopped at the limit"
    );

    // Drain: /ready goes false, new requests get a retryable 503, accepted ones finish.
    let r = c.post(admin("/admin/drain")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(c.get(s.url("/ready")).send().await.unwrap().status(), 503);
    let r = c
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    for h in first {
        let (_, _, done, finish) = h.await.unwrap();
        assert!(
            done && finish.as_deref() == Some("length"),
            "in-flight requests run to the end"
        );
    }
    let (_, _, done, _) = late.await.unwrap();
    assert!(done, "a request accepted before the drain is served too");
    c.delete(admin("/admin/drain")).send().await.unwrap();
    assert_eq!(c.get(s.url("/ready")).send().await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits() {
    let mut s = Server::start(&["--drain-grace-seconds", "60"]).await;
    let base = s.base.clone();
    let inflight = tokio::spawn(async move { stream_text(&base, good_request(60)).await });
    s.wait_metric("redline_engine_requests_running", 30, |v| v == 1.0)
        .await;
    s.wait_metric("redline_engine_shutting_down", 1, |v| v == 0.0)
        .await;
    unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    // What tells a sidecar this drain is the pod ending, not one it may lift.
    s.wait_metric("redline_engine_shutting_down", 5, |v| v == 1.0)
        .await;
    s.wait_metric("redline_engine_draining", 1, |v| v == 1.0)
        .await;
    assert_eq!(
        client().get(s.url("/ready")).send().await.unwrap().status(),
        503,
        "not ready while draining"
    );
    // The process ends with this drain: lifting it would admit requests the exit then cuts.
    let undrain = client()
        .delete(format!("{}/admin/drain", s.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(undrain.status(), 409, "a SIGTERM drain is not cancelled");
    let body: Value = undrain.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("shutting down")),
        "{body}"
    );
    assert_eq!(
        client().get(s.url("/ready")).send().await.unwrap().status(),
        503,
        "still draining"
    );
    let (_, _, done, finish) = inflight.await.unwrap();
    assert!(
        done && finish.as_deref() == Some("length"),
        "the in-flight request finished whole"
    );
    let status = exit_within(&mut s.child, Instant::now(), Duration::from_secs(10)).await;
    assert!(status.success(), "clean exit after drain: {status:?}");
}

/// Waits for the process to exit, at most `limit` after `t0`.
async fn exit_within(
    child: &mut std::process::Child,
    t0: Instant,
    limit: Duration,
) -> std::process::ExitStatus {
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(t0.elapsed() < limit, "no exit within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Behind a Service, a drained pod goes on getting requests until the endpoint change reaches
/// the proxies: the lame duck admits them (not ready meanwhile), and only then refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_admits_through_its_lame_duck_then_refuses() {
    let mut s = Server::start(&["--lame-duck-seconds", "3", "--drain-grace-seconds", "30"]).await;
    let c = client();
    let complete = || {
        c.post(s.url("/v1/completions"))
            .json(&json!({"prompt": "hi", "max_tokens": 2}))
            .send()
    };
    assert_eq!(s.metric("redline_engine_lame_duck").await, 0.0);

    // The operator's drain: out of the Service at once, still admitting.
    let r: Value = c
        .post(format!("{}/admin/drain", s.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let left = r["lame_duck_seconds_left"].as_f64().unwrap();
    assert!(left > 2.0 && left <= 3.0, "{r}");
    assert_eq!(c.get(s.url("/ready")).send().await.unwrap().status(), 503);
    assert_eq!(s.metric("redline_engine_lame_duck").await, 1.0);
    assert_eq!(s.metric("redline_engine_draining").await, 1.0);
    assert_eq!(
        complete().await.unwrap().status(),
        200,
        "admitted in the lame duck"
    );
    // Then it refuses: the Service has stopped sending by now.
    s.wait_metric("redline_engine_lame_duck", 5, |v| v == 0.0)
        .await;
    let r = complete().await.unwrap();
    assert_eq!(r.status(), 503, "refused after the lame duck");
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(s.metric("redline_engine_draining").await, 1.0);
    c.delete(format!("{}/admin/drain", s.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(c.get(s.url("/ready")).send().await.unwrap().status(), 200);

    // SIGTERM with no drain before it (a rolling update, an eviction): the same lame duck,
    // and the process stays for it, though empty.
    let t0 = Instant::now();
    unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    s.wait_metric("redline_engine_shutting_down", 5, |v| v == 1.0)
        .await;
    assert_eq!(c.get(s.url("/ready")).send().await.unwrap().status(), 503);
    assert_eq!(
        complete().await.unwrap().status(),
        200,
        "admitted in the lame duck"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(2) && s.child.try_wait().unwrap().is_none(),
        "an empty engine stays up through its lame duck"
    );
    let status = exit_within(&mut s.child, t0, Duration::from_secs(15)).await;
    assert!(
        t0.elapsed() >= Duration::from_secs(3),
        "exited {:?} after SIGTERM, inside its lame duck",
        t0.elapsed()
    );
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_non_streaming_usage_models_and_metric_names() {
    let s = Server::start(&[]).await;
    let c = client();
    let v: Value = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                      "max_tokens": 12, "temperature": 0}),
        )
        .await
        .1;
    assert_eq!(v["object"], "chat.completion");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!content.is_empty());
    // The chat endpoint is the completions endpoint over the model's own chat template.
    let templated = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
                     <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let raw: Value = s
        .post(
            "/v1/completions",
            &json!({"prompt": templated, "max_tokens": 12, "temperature": 0}),
        )
        .await
        .1;
    assert_eq!(raw["choices"][0]["text"].as_str().unwrap(), content);
    assert_eq!(raw["usage"]["prompt_tokens"], v["usage"]["prompt_tokens"]);
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );

    let m: Value = c
        .get(s.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");

    let text = c
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "redline_engine_kv_blocks_total",
        "redline_engine_kv_blocks_used",
        "redline_engine_kv_block_size",
        "redline_engine_kv_cache_usage_ratio",
        "redline_engine_requests_running",
        "redline_engine_requests_waiting",
        "redline_engine_preemptions_total",
        "redline_engine_prompt_tokens_total",
        "redline_engine_prompt_tokens_received_total",
        "redline_engine_waiting_prompt_tokens",
        "redline_engine_generation_tokens_total",
        "redline_engine_max_num_seqs",
        "redline_engine_max_batched_tokens",
        "redline_engine_requests_late_total",
        "redline_engine_time_to_first_token_seconds_bucket",
        "redline_engine_inter_token_latency_seconds_bucket",
        "redline_engine_step_duration_seconds_bucket",
        "redline_engine_kv_blocks_freed_total",
        "redline_engine_request_latency_seconds_bucket",
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:num_preemptions_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "metric {name} missing"
        );
    }
    assert!(s.metric("redline_engine_generation_tokens_total").await >= 1.0);
    // The server's default --block-size: the sidecar sizes the pool in tokens with it.
    assert_eq!(s.metric("redline_engine_kv_block_size").await, 16.0);
    // Everything admitted was received first; nothing waits once the requests are done.
    let received = s
        .metric("redline_engine_prompt_tokens_received_total")
        .await;
    assert!(received >= s.metric("redline_engine_prompt_tokens_total").await && received > 0.0);
    assert_eq!(s.metric("redline_engine_waiting_prompt_tokens").await, 0.0);
    assert!(s.metric("redline_engine_kv_blocks_total").await > 0.0);
    // The first request finished while the second still stepped: its blocks were counted
    // back (the sidecar's forecast takes them off the decoding growth).
    assert!(s.metric("redline_engine_kv_blocks_freed_total").await >= 1.0);
    // Every token came out of a step, each step timed; the two requests above ran one after
    // the other, so no step made two tokens.
    let h = redline_api::prom::Exposition::parse(&text)
        .unwrap()
        .histogram("redline_engine_step_duration_seconds")
        .expect("the step histogram");
    let generated = s.metric("redline_engine_generation_tokens_total").await;
    assert!(h.count as f64 >= generated && h.sum > 0.0, "{h:?}");
    let mean = h.sum / h.count as f64;
    assert!(mean < 10.0, "a step took {mean} s on average");
}

/// Streams a completion and returns when its first content chunk arrived.
async fn first_chunk_at(base: String, prompt: String, max_tokens: u32) -> Instant {
    let r = client()
        .post(format!("{base}/v1/completions"))
        .json(
            &json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                      "stream": true, "ignore_eos": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut bytes = r.bytes_stream();
    let mut first = None;
    while let Some(b) = bytes.next().await {
        let b = b.unwrap();
        if first.is_none() && std::str::from_utf8(&b).unwrap().contains("\"text\"") {
            first = Some(Instant::now());
        }
    }
    first.expect("a content chunk")
}

/// Which of two requests gets its first token first: `late` (a long prompt that waited past
/// the objective while admission was stopped) or `fresh` (a short one that arrived 2 s later);
/// and how many requests the engine counted late.
async fn who_goes_first(extra: &[&str]) -> (&'static str, f64) {
    let s = Server::start(&[&["--max-batched-tokens", "64"], extra].concat()).await;
    let c = client();
    let limits = |n: u32| {
        let c = c.clone();
        let url = format!("{}/admin/limits", s.admin);
        async move {
            let r = c
                .put(url)
                .json(&json!({"max_num_seqs": n, "max_batched_tokens": 64}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    // A full 64-token step, so the engine knows its prefill speed.
    let warm = c
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "the sea ".repeat(40), "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), 200);
    limits(0).await;
    let late = tokio::spawn(first_chunk_at(
        s.base.clone(),
        "Once upon a time, in a small village by the sea, ".repeat(25),
        8,
    ));
    s.wait_metric("redline_engine_requests_waiting", 30, |v| v == 1.0)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fresh = tokio::spawn(first_chunk_at(s.base.clone(), "Hello".into(), 4));
    s.wait_metric("redline_engine_requests_waiting", 30, |v| v == 2.0)
        .await;
    // One at a time: whoever is admitted first is served first.
    limits(1).await;
    let (late, fresh) = (late.await.unwrap(), fresh.await.unwrap());
    let counted = s.metric("redline_engine_requests_late_total").await;
    (if fresh < late { "fresh" } else { "late" }, counted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_ttft_objective_a_request_that_can_meet_it_goes_before_one_that_cannot() {
    // Without an objective: arrival order, as vLLM, and nothing counts as late.
    assert_eq!(who_goes_first(&[]).await, ("late", 0.0));
    // With 1.5 s: the first request can no longer make it and is served after the second
    // (which still can), not dropped; the engine counts it late.
    let (first, late) = who_goes_first(&["--ttft-objective-ms", "1500"]).await;
    assert_eq!(first, "fresh");
    assert!(late >= 1.0, "{late} requests counted late");
}

/// `(status, error code, WWW-Authenticate)` of a GET with an optional bearer key.
async fn call(url: &str, key: Option<&str>) -> (u16, Option<String>, Option<String>) {
    let mut r = client().get(url);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let v: Value = r.json().await.unwrap_or(Value::Null);
    let code = v["error"]["code"].as_str().map(String::from);
    (status, code, challenge)
}

/// Polls `/v1/models` with `key` until it answers `want` (the file is read again within a
/// second of a change); fails with `what` after 10 s.
async fn until_status(s: &Server, key: &str, want: u16, what: &str) {
    let t0 = Instant::now();
    while call(&s.url("/v1/models"), Some(key)).await.0 != want {
        assert!(t0.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_from_a_file_guard_the_openai_api_and_rotate_without_a_restart() {
    let dir = std::env::temp_dir().join(format!("redline-api-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys");
    std::fs::write(&file, "sk-old\n").unwrap();
    let s = Server::start(&["--api-key-file", file.to_str().unwrap()]).await;
    let refused = (
        401,
        Some("invalid_api_key".to_string()),
        Some("Bearer".to_string()),
    );
    assert_eq!(call(&s.url("/v1/models"), None).await, refused);
    assert_eq!(call(&s.url("/v1/models"), Some("sk-wrong")).await, refused);
    assert_eq!(call(&s.url("/v1/models"), Some("sk-old")).await.0, 200);
    // vLLM's tokenizer endpoints are guarded too.
    let (status, _) = s.post("/tokenize", &json!({"prompt": "hi"})).await;
    assert_eq!(status, 401);
    // The probes and the sidecar's scrape need no key.
    for open in ["/health", "/ready", "/metrics"] {
        assert_eq!(call(&s.url(open), None).await.0, 200, "{open}");
    }
    // A refused completion costs nobody else: one runs beside it with the key.
    let mut body = good_request(16);
    body["stream"] = json!(false);
    let unkeyed = client()
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(unkeyed.status(), 401);
    let keyed = client()
        .post(s.url("/v1/completions"))
        .bearer_auth("sk-old")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(keyed.status(), 200);
    let v: Value = keyed.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 16);

    // Rotation, as a Secret volume is updated: the new key beside the old, then the old gone.
    std::fs::write(&file, "sk-new\nsk-old\n").unwrap();
    until_status(&s, "sk-new", 200, "the new key never took").await;
    assert_eq!(call(&s.url("/v1/models"), Some("sk-old")).await.0, 200);
    std::fs::write(&file, "sk-new\n").unwrap();
    until_status(&s, "sk-old", 401, "the old key still works").await;
    // Emptied by mistake: the last keys stay in force (neither open nor shut).
    std::fs::write(&file, "").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(call(&s.url("/v1/models"), Some("sk-new")).await.0, 200);
    assert_eq!(call(&s.url("/v1/models"), None).await.0, 401);
    // Every refusal counted: two at first, the completion, the old key's polls, the last.
    let counted = s.metric("redline_engine_requests_unauthorized_total").await;
    assert!(counted >= 5.0, "{counted} refusals counted");
}

#[test]
fn an_unreadable_or_empty_key_file_stops_the_engine_before_it_serves() {
    let dir = std::env::temp_dir().join(format!("redline-api-keys-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty");
    std::fs::write(&empty, "\n# no key yet\n").unwrap();
    for (file, says) in [
        (empty.as_path(), "holds no key"),
        (
            std::path::Path::new("/nonexistent/keys"),
            "reading the API key file",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_redline-engine"))
            .args([
                "serve",
                "--port",
                "0",
                "--admin-port",
                "0",
                "--api-key-file",
            ])
            .arg(file)
            .arg("--model")
            .arg(common::model_path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {}", file.display());
        assert!(stderr.contains(says), "{stderr}");
    }
}

/// A greedy completion's text and token count with the extra sampling fields.
async fn greedy_text(s: &Server, prompt: &str, extra: Value) -> (String, u64) {
    let body = with(
        json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": true}),
        extra,
    );
    let v = s.post("/v1/completions", &body).await.1;
    (
        v["choices"][0]["text"].as_str().unwrap().to_string(),
        v["usage"]["completion_tokens"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logit_bias_and_penalties_steer_the_real_model() {
    let s = Server::start(&[]).await;
    let story = "Once upon a time, in a small village by the sea,";
    let (plain, n) = greedy_text(&s, story, json!({})).await;
    assert_eq!(n, 12);
    // The bias forces one token: the text is one piece, twelve times.
    let (forced, _) = greedy_text(&s, story, json!({"logit_bias": {"28": 100}})).await;
    let piece = &forced[..forced.len() / 12];
    assert!(
        !piece.is_empty() && forced == piece.repeat(12),
        "{forced:?}"
    );
    assert_ne!(forced, plain);
    // Greedy decoding of a count loops; penalties that grow with the repeats (frequency) or
    // scale the logit (repetition, which counts the prompt too) break it. (Presence subtracts
    // a constant once, too little against this loop's margin: unit-tested in sampling.rs.)
    let count = "1, 1, 1, 1, 1, 1, 1, 1,";
    let ones = |t: &str| t.matches('1').count();
    let (looping, _) = greedy_text(&s, count, json!({})).await;
    for penalty in ["frequency_penalty", "repetition_penalty"] {
        let (broken, _) = greedy_text(&s, count, json!({ penalty: 2.0 })).await;
        assert!(
            ones(&broken) < ones(&looping),
            "{penalty}: {broken:?} repeats as much as {looping:?}"
        );
    }
    // top_k 1 is greedy whatever the temperature.
    let (k1, _) = greedy_text(
        &s,
        story,
        json!({"temperature": 1.5, "top_k": 1, "seed": 5}),
    )
    .await;
    assert_eq!(k1, plain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_come_with_every_generated_token_streamed_or_not() {
    let s = Server::start(&[]).await;
    // Completions: the four lists, one entry per generated token.
    let v: Value = s
        .post(
            "/v1/completions",
            &json!({"prompt": "The capital of France is", "max_tokens": 8,
                      "temperature": 0, "logprobs": 3}),
        )
        .await
        .1;
    let choice = &v["choices"][0];
    let lp = &choice["logprobs"];
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    let tokens = strs(&lp["tokens"]);
    assert_eq!(tokens.len(), n, "{lp}");
    assert_eq!(tokens.concat(), choice["text"].as_str().unwrap(), "{lp}");
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    for (i, token) in tokens.iter().enumerate() {
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(chosen <= 0.0 && chosen > -50.0, "{chosen}");
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert!((3..=4).contains(&top.len()), "{top:?}");
        // Greedy: the sampled token is the likeliest (ties aside).
        let best = top
            .values()
            .map(|l| l.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(chosen >= best - 1e-4, "{token:?}: {chosen} < {best}");
        assert_eq!(top[*token].as_f64().unwrap(), chosen);
    }
    // Not asked: null, as before.
    let plain: Value = s
        .post(
            "/v1/completions",
            &json!({"prompt": "The capital of France is", "max_tokens": 2}),
        )
        .await
        .1;
    assert!(plain["choices"][0]["logprobs"].is_null());

    // Chat, whole and streamed: the same tokens with the same logprobs, two alternatives each.
    let chat = |stream: bool| {
        json!({"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 10,
               "temperature": 0, "logprobs": true, "top_logprobs": 2, "stream": stream,
               "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null }})
    };
    let whole: Value = s.post("/v1/chat/completions", &chat(false)).await.1;
    let content = whole["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        content.len() as u64,
        whole["usage"]["completion_tokens"].as_u64().unwrap()
    );
    for e in &content {
        let token = e["token"].as_str().unwrap();
        let bytes: Vec<u8> = e["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(bytes, token.as_bytes());
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 2, "{e}");
    }
    let body = client()
        .post(s.url("/v1/chat/completions"))
        .json(&chat(true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut streamed = Vec::new();
    for line in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(line).unwrap();
        if let Some(c) = v["choices"][0]["logprobs"]["content"].as_array() {
            streamed.extend(c.iter().cloned());
        }
    }
    let pairs = |v: &[Value]| -> Vec<(String, f64)> {
        v.iter()
            .map(|e| {
                (
                    e["token"].as_str().unwrap().to_string(),
                    e["logprob"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (a, b) = (pairs(&content), pairs(&streamed));
    assert_eq!(a.len(), b.len(), "streamed {b:?}\nwhole {a:?}");
    for ((ta, la), (tb, lb)) in a.iter().zip(&b) {
        assert_eq!(ta, tb);
        assert!((la - lb).abs() < 1e-3, "{ta:?}: {la} vs {lb}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_are_seeded_draws_whole_or_streamed() {
    let s = Server::start(&[]).await;
    let post = |path: &'static str, body: Value| {
        let s = &s;
        async move { s.post(path, &body).await.1 }
    };
    let story = json!({"prompt": "Once upon a time,", "max_tokens": 8, "temperature": 1.0,
                       "seed": 7, "ignore_eos": true});
    let three = post("/v1/completions", with(story.clone(), json!({"n": 3}))).await;
    let texts: Vec<&str> = three["choices"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i);
            c["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(texts.len(), 3);
    assert!(
        texts[0] != texts[1] || texts[1] != texts[2],
        "three draws alike: {texts:?}"
    );
    // The prompt counts once, the completions add up.
    let one = post("/v1/completions", story.clone()).await;
    assert_eq!(
        three["usage"]["prompt_tokens"],
        one["usage"]["prompt_tokens"]
    );
    assert_eq!(three["usage"]["completion_tokens"], 24);
    // Choice 0 is the seed's own draw; the whole answer is reproducible.
    assert_eq!(texts[0], one["choices"][0]["text"].as_str().unwrap());
    let again = post("/v1/completions", with(story, json!({"n": 3}))).await;
    assert_eq!(again["choices"], three["choices"]);

    // Chat streamed with n = 2: one choice per chunk, each index's pieces make its whole
    // answer, one finish reason each, the usage chunk sums them, [DONE] last.
    let chat = json!({"messages": [{"role": "user", "content": "Name a colour."}], "n": 2,
                      "max_tokens": 6, "temperature": 1.0, "seed": 3, "ignore_eos": true});
    let whole = post("/v1/chat/completions", chat.clone()).await;
    let body = client()
        .post(s.url("/v1/chat/completions"))
        .json(&with(
            chat,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let (mut text, mut finishes, mut roles) = ([String::new(), String::new()], [0, 0], [0, 0]);
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        let choices = v["choices"].as_array().unwrap();
        if choices.is_empty() {
            usage = Some(v["usage"].clone());
            continue;
        }
        assert_eq!(choices.len(), 1, "{v}");
        let i = choices[0]["index"].as_u64().unwrap() as usize;
        text[i].push_str(choices[0]["delta"]["content"].as_str().unwrap_or(""));
        finishes[i] += choices[0]["finish_reason"].is_string() as usize;
        roles[i] += choices[0]["delta"]["role"].is_string() as usize;
    }
    assert_eq!((finishes, roles), ([1, 1], [1, 1]));
    for (i, t) in text.iter().enumerate() {
        assert_eq!(
            t,
            whole["choices"][i]["message"]["content"].as_str().unwrap()
        );
    }
    assert_eq!(usage.unwrap()["completion_tokens"], 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_scores_the_prompt_as_generation_scored_the_same_tokens() {
    let s = Server::start(&[]).await;
    let post = |body: Value| {
        let s = &s;
        async move { s.post("/v1/completions", &body).await.1 }
    };
    let prompt = "The capital of France is";
    let gen = post(json!({"prompt": prompt, "max_tokens": 6, "temperature": 0,
                          "ignore_eos": true, "logprobs": 1}))
    .await;
    let generated = gen["choices"][0]["text"].as_str().unwrap().to_string();
    let gen_lp = &gen["choices"][0]["logprobs"];
    // The prompt and its answer sent back as one prompt, echoed with logprobs and one more
    // token (what lm-evaluation-harness asks for a loglikelihood).
    let whole = format!("{prompt}{generated}");
    let echo = post(json!({"prompt": whole, "max_tokens": 1, "temperature": 0,
                           "echo": true, "logprobs": 1}))
    .await;
    let choice = &echo["choices"][0];
    let text = choice["text"].as_str().unwrap();
    assert!(text.starts_with(&whole), "{text:?}");
    let lp = &choice["logprobs"];
    let tokens = strs(&lp["tokens"]);
    let usage = &echo["usage"];
    assert_eq!(
        tokens.len() as u64,
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(tokens.concat(), text);
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
    // The answer's tokens, scored inside the prompt (one prefill, every position), have the
    // logprobs they were generated with (one decode step each): the same to the last bit,
    // the Q4_1 kernels being batch-invariant (measured: 0 difference).
    let k = gen_lp["tokens"].as_array().unwrap().len();
    let n = tokens.len();
    let scored = &lp["token_logprobs"].as_array().unwrap()[n - 1 - k..n - 1];
    assert_eq!(
        &lp["tokens"].as_array().unwrap()[n - 1 - k..n - 1],
        gen_lp["tokens"].as_array().unwrap().as_slice()
    );
    for (a, b) in scored
        .iter()
        .zip(gen_lp["token_logprobs"].as_array().unwrap())
    {
        let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
        assert!(
            (a - b).abs() < 1e-5,
            "{a} scored in the prompt, {b} generated"
        );
    }
    // Twice the same: the second is not served from the prefix cache (whose logits are gone).
    let again = post(json!({"prompt": whole, "max_tokens": 1, "temperature": 0,
                            "echo": true, "logprobs": 1}))
    .await;
    assert_eq!(again["choices"][0]["logprobs"], *lp);
    // Echo alone: the prompt in front of the text, no logprobs; streamed, in the first chunk.
    let plain = post(json!({"prompt": prompt, "max_tokens": 3, "echo": true})).await;
    assert!(plain["choices"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with(prompt));
    assert!(plain["choices"][0]["logprobs"].is_null());
    let (streamed, _, done, _) = stream_text(
        &s.base,
        json!({"prompt": prompt, "max_tokens": 3, "temperature": 0, "echo": true,
               "ignore_eos": true, "stream": true}),
    )
    .await;
    assert!(done && streamed.starts_with(prompt), "{streamed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_prompts_answers_each_as_alone_in_openai_order() {
    let s = Server::start(&[]).await;
    let post = |body: Value| {
        let s = &s;
        async move { s.post("/v1/completions", &body).await }
    };
    let greedy = json!({"max_tokens": 4, "temperature": 0, "ignore_eos": true});
    let prompts = ["The capital of France is", "1, 2, 3,"];
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(post(with(greedy.clone(), json!({ "prompt": p }))).await.1);
    }
    let (status, batch) = post(with(greedy.clone(), json!({"prompt": prompts, "n": 2}))).await;
    assert_eq!(status, 200, "{batch}");
    let choices = batch["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    // Choice i * n + j is prompt i's j-th.
    for (k, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], k);
        assert_eq!(c["text"], alone[k / 2]["choices"][0]["text"], "choice {k}");
    }
    let prompt_tokens: u64 = alone
        .iter()
        .map(|a| a["usage"]["prompt_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(
        batch["usage"]["prompt_tokens"], prompt_tokens,
        "each prompt counted once"
    );
    assert_eq!(batch["usage"]["completion_tokens"], 16);
    // lm-evaluation-harness's loglikelihood batch: echo with logprobs, one token each.
    let (_, scored) = post(json!({"prompt": prompts, "max_tokens": 1, "temperature": 0,
                                  "echo": true, "logprobs": 1}))
    .await;
    for (i, c) in scored["choices"].as_array().unwrap().iter().enumerate() {
        assert!(c["text"].as_str().unwrap().starts_with(prompts[i]), "{c}");
        assert!(c["logprobs"]["token_logprobs"][0].is_null(), "{c}");
    }
    // One prompt past the context fails the request, naming it; too many sequences too.
    let long = "word ".repeat(9000);
    let (status, err) = post(with(greedy.clone(), json!({"prompt": [prompts[0], long]}))).await;
    assert_eq!(status, 400);
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("prompt 1: "),
        "{err}"
    );
    let (status, _) = post(with(
        greedy,
        json!({"prompt": vec![prompts[0]; 33], "n": 2}),
    ))
    .await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_counts_what_a_request_is_billed_and_detokenize_inverts_it() {
    let s = Server::start(&[]).await;
    let prompt = "The capital of France is";
    // A prompt as is, and a chat through the model's template, as each endpoint counts it.
    let messages = json!([{"role": "user", "content": "Say hello in French."}]);
    let mut counted = Vec::new();
    for (input, endpoint) in [
        (json!({ "prompt": prompt }), "/v1/completions"),
        (json!({ "messages": messages }), "/v1/chat/completions"),
    ] {
        let (status, t) = s.post("/tokenize", &input).await;
        assert_eq!(status, 200, "{t}");
        let mut request = input.clone();
        request["max_tokens"] = json!(1);
        let done = s.post(endpoint, &request).await.1;
        assert_eq!(t["count"], done["usage"]["prompt_tokens"], "{endpoint}");
        counted.push(t);
    }
    let t = &counted[0];
    assert_eq!(
        t["tokens"].as_array().unwrap().len() as u64,
        t["count"].as_u64().unwrap()
    );
    assert!(t["max_model_len"].as_u64().unwrap() > 0);
    let (_, back) = s.post("/detokenize", &json!({"tokens": t["tokens"]})).await;
    assert_eq!(back["prompt"], prompt);
    for bad in [json!({}), json!({"prompt": "a", "messages": messages})] {
        assert_eq!(s.post("/tokenize", &bad).await.0, 400, "{bad}");
    }
    assert_eq!(
        s.post("/detokenize", &json!({"tokens": [4_000_000_000u32]}))
            .await
            .0,
        400
    );
}

/// A continuation's loglikelihood after a context, as lm-evaluation-harness computes one: the
/// context and continuation as one prompt with `echo`, `logprobs: 1`, `max_tokens: 1`, and the
/// sum of the continuation tokens' logprobs (those after the context's tokens, less the one
/// generated), with whether each was the likeliest (greedy).
async fn loglikelihood(s: &Server, context: &str, continuation: &str) -> (f64, bool) {
    let ctx = s.post("/tokenize", &json!({ "prompt": context })).await.1["count"]
        .as_u64()
        .unwrap() as usize;
    let (status, v) = s
        .post(
            "/v1/completions",
            &json!({"prompt": format!("{context}{continuation}"), "max_tokens": 1,
                    "temperature": 0, "echo": true, "logprobs": 1}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let scores = lp["token_logprobs"].as_array().unwrap();
    let tops = lp["top_logprobs"].as_array().unwrap();
    let end = scores.len() - 1;
    let mut sum = 0.0;
    let mut greedy = true;
    for i in ctx..end {
        let l = scores[i].as_f64().unwrap();
        sum += l;
        let best = tops[i]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        greedy &= l >= best;
    }
    (sum, greedy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loglikelihood_as_an_eval_harness_asks_ranks_the_right_answer_first() {
    let s = Server::start(&[]).await;
    let context = "The capital of France is";
    let (paris, greedy) = loglikelihood(&s, context, " Paris").await;
    let (london, _) = loglikelihood(&s, context, " London").await;
    let (banana, _) = loglikelihood(&s, context, " a banana").await;
    assert!(
        paris > london && london > banana,
        "{paris} {london} {banana}"
    );
    assert!(
        greedy,
        "' Paris' is what the model says itself (the completion tests)"
    );
}
