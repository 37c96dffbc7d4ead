//! How the load generator reaches a pod: straight at its IP (the local cluster routes pod IPs to
//! the host; completions stream, so time to first token is measured), or through the API
//! server's pod proxy (any cluster, kind included; whole responses only).

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;

/// A pod to send to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub namespace: String,
    pub pod: String,
    pub ip: String,
}

/// One try of one request at one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// Answered in full.
    Done {
        ttft: Option<f64>,
        completion_tokens: u64,
    },
    /// Never accepted (the pod is draining or gone): safe to send elsewhere, as a Service's
    /// proxy would.
    Refused(String),
    /// Accepted and then lost, or refused as the client's error: a failed request.
    Failed(String),
}

#[derive(Clone)]
pub enum Transport {
    PodIp(reqwest::Client),
    Proxy(kube::Client),
}

impl Transport {
    pub fn pod_ip() -> Self {
        Self::pod_ip_with_key(None).expect("an HTTP client")
    }

    /// Straight at the pods, with `Authorization: Bearer <key>` on every request when the
    /// service requires an API key (`spec.apiKeySecret`). The key is marked sensitive, so
    /// reqwest never prints it in a debug dump.
    pub fn pod_ip_with_key(api_key: Option<&str>) -> Result<Self, String> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(k) = api_key {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", k.trim()))
                .map_err(|_| "the API key holds characters a header cannot".to_string())?;
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .default_headers(headers)
            .build()
            .map(Self::PodIp)
            .map_err(|e| e.to_string())
    }

    /// `GET` a pod's `port` and `path` (metrics).
    pub async fn get(&self, t: &Target, port: u16, path: &str) -> Result<String, String> {
        match self {
            Self::PodIp(c) => {
                let r = c
                    .get(format!("http://{}:{port}{path}", t.ip))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if !r.status().is_success() {
                    return Err(format!("{}", r.status()));
                }
                r.text().await.map_err(|e| e.to_string())
            }
            Self::Proxy(c) => {
                let uri = format!(
                    "/api/v1/namespaces/{}/pods/{}:{port}/proxy{path}",
                    t.namespace, t.pod
                );
                let req = http::Request::get(uri).body(Vec::new()).unwrap();
                c.request_text(req).await.map_err(|e| e.to_string())
            }
        }
    }

    /// One completion (`body` without `stream`).
    pub async fn complete(&self, t: &Target, body: &Value) -> Attempt {
        match self {
            Self::PodIp(c) => stream_completion(c, t, body).await,
            Self::Proxy(c) => proxy_completion(c, t, body).await,
        }
    }
}

async fn stream_completion(c: &reqwest::Client, t: &Target, body: &Value) -> Attempt {
    let mut body = body.clone();
    body["stream"] = Value::Bool(true);
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let start = Instant::now();
    let resp = match c
        .post(format!("http://{}:8000/v1/completions", t.ip))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r,
        // Nothing reached the engine.
        Err(e) if e.is_connect() => return Attempt::Refused(format!("{}: {e}", t.pod)),
        Err(e) => return Attempt::Failed(format!("{}: {e}", t.pod)),
    };
    let status = resp.status();
    if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
        return Attempt::Refused(format!("{}: 503", t.pod));
    }
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Attempt::Failed(format!("{}: {status}: {text}", t.pod));
    }
    let mut ttft = None;
    let mut usage = None;
    let mut done = false;
    let mut buf = String::new();
    let mut chunks = resp.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return Attempt::Failed(format!("{}: stream cut: {e}", t.pod)),
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                return Attempt::Failed(format!("{}: bad event {data:?}", t.pod));
            };
            if v.get("error").is_some() {
                return Attempt::Failed(format!("{}: {data}", t.pod));
            }
            if ttft.is_none() && v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                ttft = Some(start.elapsed().as_secs_f64());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage = Some(n);
            }
        }
    }
    match (done, usage) {
        (true, Some(n)) => Attempt::Done {
            ttft,
            completion_tokens: n,
        },
        _ => Attempt::Failed(format!(
            "{}: the stream ended without [DONE] and usage",
            t.pod
        )),
    }
}

async fn proxy_completion(c: &kube::Client, t: &Target, body: &Value) -> Attempt {
    let uri = format!(
        "/api/v1/namespaces/{}/pods/{}:8000/proxy/v1/completions",
        t.namespace, t.pod
    );
    let req = http::Request::post(uri)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).unwrap())
        .unwrap();
    match c.request_text(req).await {
        Ok(text) => match serde_json::from_str::<Value>(&text) {
            Ok(v) => match v["usage"]["completion_tokens"].as_u64() {
                Some(n) => Attempt::Done {
                    ttft: None,
                    completion_tokens: n,
                },
                None => Attempt::Failed(format!("{}: no usage in {text}", t.pod)),
            },
            Err(e) => Attempt::Failed(format!("{}: {e}: {text}", t.pod)),
        },
        // 503 from a draining engine, or the proxy finding no pod (gone) or no endpoint.
        Err(kube::Error::Api(s)) if s.code == 503 || s.code == 404 || s.code == 502 => {
            Attempt::Refused(format!("{}: {}", t.pod, s.code))
        }
        Err(e) => Attempt::Failed(format!("{}: {e}", t.pod)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// The request head a one-shot HTTP server received, answered with an empty 200.
    fn one_request() -> (u16, std::thread::JoinHandle<String>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let mut head = String::new();
            while !head.contains("\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                head.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .unwrap();
            head.to_ascii_lowercase()
        });
        (port, h)
    }

    fn local() -> Target {
        Target {
            namespace: "ns".into(),
            pod: "p".into(),
            ip: "127.0.0.1".into(),
        }
    }

    #[tokio::test]
    async fn the_api_key_goes_with_every_request_and_only_when_given() {
        for key in [Some(" sk-load \n"), None] {
            let (port, head) = one_request();
            let t = Transport::pod_ip_with_key(key).unwrap();
            t.get(&local(), port, "/v1/models").await.unwrap();
            let head = head.join().unwrap();
            assert_eq!(
                head.contains("authorization: bearer sk-load\r\n"),
                key.is_some(),
                "{head}"
            );
        }
        assert!(Transport::pod_ip_with_key(Some("sk\nbad")).is_err());
    }
}
