//! The autoscaling loop's calls to the pods' sidecars, at the pod IP with the service's token:
//! `GET /v1/pressure` (the report the policy reads) and `PUT /v1/limits` (limit targets and
//! drains). A sidecar that stops answering is logged once, and once again when it answers.

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus::IntCounterVec;
use redline_api::{LimitsRequest, PressureReport};
use redline_autoscale::PodPhase;
use tracing::{debug, info, warn};

use crate::children::SIDECAR_PORT;
use crate::engine_pods::PodEntry;

/// Why a pod's pressure report is missing.
#[derive(Debug, Clone, PartialEq)]
pub enum ReadError {
    /// The sidecar refused the token: the Secret was recreated.
    Unauthorized,
    /// Not read: a pod with no IP, or one the loop does not read.
    Skipped,
    /// The sidecar did not answer, or answered with an error.
    Failed(String),
}

pub struct Sidecars {
    http: reqwest::Client,
    /// Reads by outcome (`ok`, `error`).
    reads: IntCounterVec,
}

impl Sidecars {
    pub fn new(reads: IntCounterVec) -> Self {
        Self {
            // A sidecar answers from memory; one that takes longer is as good as down, and
            // the pass must not wait on it.
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(2))
                .build()
                .expect("an HTTP client"),
            reads,
        }
    }

    /// A pod's report.
    pub async fn pressure(&self, ip: &str, token: &str) -> Result<PressureReport, ReadError> {
        let url = format!("http://{ip}:{SIDECAR_PORT}/v1/pressure");
        let r = self.http.get(&url).bearer_auth(token).send().await;
        let read = match r {
            Ok(resp) if resp.status().is_success() => resp
                .json::<PressureReport>()
                .await
                .map_err(|e| ReadError::Failed(format!("its report at {url} did not parse: {e}"))),
            Ok(resp) if resp.status() == reqwest::StatusCode::UNAUTHORIZED => {
                debug!(%url, "pressure report: token refused");
                Err(ReadError::Unauthorized)
            }
            Ok(resp) => Err(ReadError::Failed(format!(
                "{url} answered HTTP {}",
                resp.status()
            ))),
            Err(e) => Err(ReadError::Failed(format!("{url} unreachable: {e}"))),
        };
        self.reads
            .with_label_values(&[if read.is_ok() { "ok" } else { "error" }])
            .inc();
        read
    }

    /// Every entry's report at once; `Skipped` for a pod not read.
    pub async fn pressures(
        &self,
        entries: &[PodEntry],
        token: &str,
    ) -> Vec<Result<PressureReport, ReadError>> {
        futures::future::join_all(entries.iter().map(|e| async move {
            match &e.ip {
                Some(ip) => self.pressure(ip, token).await,
                None => Err(ReadError::Skipped),
            }
        }))
        .await
    }

    /// Whether the sidecar took the limits. A refusal is a bug of ours (logged); an
    /// unreachable sidecar is the pass's read failure, logged there.
    pub async fn put_limits(&self, ip: &str, token: &str, body: &LimitsRequest) -> bool {
        let url = format!("http://{ip}:{SIDECAR_PORT}/v1/limits");
        match self
            .http
            .put(&url)
            .bearer_auth(token)
            .json(body)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => true,
            Ok(r) => {
                warn!(%url, status = %r.status(), "sidecar refused the limits");
                false
            }
            Err(e) => {
                debug!(%url, "setting limits: {e}");
                false
            }
        }
    }
}

/// Logs once when a ready pod's sidecar stops answering (the policy then holds its
/// scale-downs: it never drains on missing data) and once when it answers again. `unread` is
/// the service's ready pods whose sidecar did not answer at the last pass, with the error.
pub fn log_read_failures(
    unread: &mut BTreeMap<String, String>,
    k: &str,
    entries: &[PodEntry],
    reads: &[Result<PressureReport, ReadError>],
) {
    let now: Vec<(String, Option<String>)> = entries
        .iter()
        .zip(reads)
        .filter(|(e, _)| e.phase == PodPhase::Ready)
        .map(|(e, r)| {
            let err = match r {
                Ok(_) => None,
                Err(ReadError::Failed(e)) => Some(e.clone()),
                Err(ReadError::Unauthorized) => Some("the sidecar refused the token".into()),
                Err(ReadError::Skipped) => Some("the pod has no IP".into()),
            };
            (e.name.clone(), err)
        })
        .collect();
    let (failing, recovered) = read_failure_changes(unread, &now);
    for (pod, e) in failing {
        warn!(isvc = %k, %pod, "no pressure report from the pod's sidecar: {e}");
    }
    for pod in recovered {
        info!(isvc = %k, %pod, "the pod's sidecar reports again");
    }
}

/// The changes in which ready pods' sidecars fail to answer, to log each once: pods that
/// began failing (with the error) or fail with another error, and pods that answer again.
/// `now` is this pass's ready pods with their read error; a pod no longer listed is forgotten
/// without a word (deleted, or not ready: it is not read for the policy).
fn read_failure_changes(
    unread: &mut BTreeMap<String, String>,
    now: &[(String, Option<String>)],
) -> (Vec<(String, String)>, Vec<String>) {
    let mut failing = Vec::new();
    let mut recovered = Vec::new();
    for (pod, err) in now {
        match err {
            Some(e) if unread.get(pod) != Some(e) => {
                unread.insert(pod.clone(), e.clone());
                failing.push((pod.clone(), e.clone()));
            }
            Some(_) => {}
            None => {
                if unread.remove(pod).is_some() {
                    recovered.push(pod.clone());
                }
            }
        }
    }
    unread.retain(|p, _| now.iter().any(|(n, _)| n == p));
    (failing, recovered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::report;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use prometheus::Opts;
    use redline_api::{GuardSettings, Level, Limits};

    /// A sidecar at `ip`, on the port the loop reads, that answers by the token it is given:
    /// `good` a report, `stale` 401, `broken` a body that is no report, anything else 500.
    /// `PUT /v1/limits` takes a drain from `good` only.
    async fn fake_sidecar(ip: &str) {
        async fn pressure(h: HeaderMap) -> axum::response::Response {
            match h.get("authorization").and_then(|v| v.to_str().ok()) {
                Some("Bearer good") => axum::Json(report(0.4, Level::Ok)).into_response(),
                Some("Bearer stale") => StatusCode::UNAUTHORIZED.into_response(),
                Some("Bearer broken") => "not a report".into_response(),
                _ => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            }
        }
        async fn limits(h: HeaderMap, body: axum::Json<LimitsRequest>) -> StatusCode {
            let good = h.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer good");
            if good && body.drain {
                StatusCode::OK
            } else {
                StatusCode::BAD_REQUEST
            }
        }
        let app = axum::Router::new()
            .route("/v1/pressure", axum::routing::get(pressure))
            .route("/v1/limits", axum::routing::put(limits));
        let listener = tokio::net::TcpListener::bind((ip, SIDECAR_PORT as u16))
            .await
            .expect("a loopback address of its own");
        tokio::spawn(async move { axum::serve(listener, app).await });
    }

    #[tokio::test]
    async fn each_way_a_sidecar_can_fail_reads_as_what_it_is() {
        let ip = "127.77.0.1";
        fake_sidecar(ip).await;
        let reads = IntCounterVec::new(Opts::new("reads", "reads"), &["outcome"]).unwrap();
        let s = Sidecars::new(reads.clone());
        let got = s.pressure(ip, "good").await.expect("a report");
        assert_eq!(got.engine.map(|e| e.kv_usage_ratio), Some(0.4));
        assert_eq!(s.pressure(ip, "stale").await, Err(ReadError::Unauthorized));
        let bad = |r: Result<PressureReport, ReadError>, what: &str| match r {
            Err(ReadError::Failed(e)) => assert!(e.contains(what), "{e}"),
            other => panic!("{other:?}"),
        };
        bad(s.pressure(ip, "broken").await, "did not parse");
        bad(s.pressure(ip, "other").await, "answered HTTP 500");
        bad(s.pressure("127.77.0.2", "good").await, "unreachable");
        assert_eq!(reads.with_label_values(&["ok"]).get(), 1);
        assert_eq!(reads.with_label_values(&["error"]).get(), 4);
        // Entries without an IP are skipped, not read.
        let entries = [
            PodEntry {
                name: "a".into(),
                phase: PodPhase::Ready,
                ip: Some(ip.into()),
            },
            PodEntry {
                name: "b".into(),
                phase: PodPhase::Starting,
                ip: None,
            },
        ];
        let both = s.pressures(&entries, "good").await;
        assert!(
            both[0].is_ok() && both[1] == Err(ReadError::Skipped),
            "{both:?}"
        );
        let drain = LimitsRequest::target(Limits::new(8, 512), GuardSettings::default(), true);
        assert!(s.put_limits(ip, "good", &drain).await);
        assert!(!s.put_limits(ip, "stale", &drain).await, "refused");
        assert!(
            !s.put_limits("127.77.0.2", "good", &drain).await,
            "unreachable"
        );
    }

    #[test]
    fn a_sidecar_that_stops_answering_is_logged_once_and_once_again_when_it_answers() {
        let mut unread = BTreeMap::new();
        let pass = |a: Option<&str>, b: Option<&str>| {
            vec![
                ("a".to_string(), a.map(String::from)),
                ("b".to_string(), b.map(String::from)),
            ]
        };
        let none: (Vec<(String, String)>, Vec<String>) = (vec![], vec![]);
        assert_eq!(read_failure_changes(&mut unread, &pass(None, None)), none);
        assert_eq!(
            read_failure_changes(&mut unread, &pass(Some("refused"), None)),
            (vec![("a".into(), "refused".into())], vec![])
        );
        assert_eq!(
            read_failure_changes(&mut unread, &pass(Some("refused"), None)),
            none,
            "the same error again: not logged"
        );
        assert_eq!(
            read_failure_changes(&mut unread, &pass(Some("timed out"), None)),
            (vec![("a".into(), "timed out".into())], vec![]),
            "another error is news"
        );
        assert_eq!(
            read_failure_changes(&mut unread, &pass(None, None)),
            (vec![], vec!["a".to_string()])
        );
        // A pod that fails, then leaves (deleted, or no longer ready), is forgotten quietly.
        read_failure_changes(&mut unread, &pass(None, Some("refused")));
        assert_eq!(
            read_failure_changes(&mut unread, &pass(None, None)[..1]),
            none
        );
        assert!(unread.is_empty());
    }
}
