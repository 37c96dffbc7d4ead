//! One closed-loop run: the replay and the observer side by side, then (optionally) waiting for
//! the autoscaler to bring the service back down, then the service's Events.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use kube::api::ListParams;
use kube::{Api, Client};
use redline_sim::trace::Request;

use crate::observe::{self, PodSample, ReadyPods, Sample, ServiceView};
use crate::replay::{self, Counters, RequestOutcome};
use crate::transport::{Target, Transport};

#[derive(Debug, Clone)]
pub struct Config {
    pub namespace: String,
    pub service: String,
    /// How often pods are listed and their metrics read; a [`Sample`] is taken every fourth tick.
    pub tick: Duration,
    /// After the last answer, keep watching until the service is back to this many replicas
    /// (desired and existing pods), for at most `settle_timeout`.
    pub settle_to: Option<i32>,
    pub settle_timeout: Duration,
}

/// An Event about the service, first seen `t` seconds after the replay started. Kubernetes
/// folds repeats of a reason into one Event with a count (its note is the first one's).
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub t: f64,
    pub reason: String,
    pub note: String,
    pub count: u32,
}

#[derive(Debug, Clone, Default)]
pub struct Run {
    pub requests: Vec<RequestOutcome>,
    pub samples: Vec<Sample>,
    /// Every pod's samples, by pod name.
    pub pods: BTreeMap<String, Vec<PodSample>>,
    pub events: Vec<EventRecord>,
    /// Seconds from the first arrival to the end of the replay (last answer).
    pub replay_seconds: f64,
    /// Whether the service was back at `settle_to` when the run ended.
    pub settled: bool,
}

pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Replays `jobs` against the service and watches the loop; `on_sample` sees each [`Sample`]
/// as it is taken (the live table).
pub async fn run(
    client: Client,
    transport: Transport,
    cfg: &Config,
    jobs: Vec<Request>,
    mut on_sample: impl FnMut(&Sample),
) -> Result<Run> {
    let ready: ReadyPods = Arc::new(RwLock::new(Vec::<Target>::new()));
    let counters = Arc::new(Counters::default());
    let mut out = Run::default();
    let started_ms = unix_ms();
    let start = tokio::time::Instant::now();
    let mut replay = tokio::spawn(replay::replay(
        transport.clone(),
        ready.clone(),
        jobs,
        start,
        counters.clone(),
    ));
    let mut tick = tokio::time::interval(cfg.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut n, mut last_sent, mut replay_done, mut pods, mut service) = (
        0u64,
        (0u64, 0.0),
        None::<f64>,
        Vec::new(),
        ServiceView::default(),
    );
    loop {
        tokio::select! {
            r = &mut replay, if replay_done.is_none() => {
                out.requests = r.context("the replay task")?;
                replay_done = Some(start.elapsed().as_secs_f64());
                out.replay_seconds = replay_done.unwrap();
                continue;
            }
            _ = tick.tick() => {}
        }
        let t = start.elapsed().as_secs_f64();
        // A failed list (an API server restart) keeps the last view: requests keep flowing.
        if let Ok(p) = observe::pods(&client, &cfg.namespace, &cfg.service).await {
            pods = p;
            *ready.write().unwrap() = pods
                .iter()
                .filter(|p| p.ready && !p.deleting)
                .map(|p| p.target.clone())
                .collect();
        }
        let scraped = observe::scrape(&transport, &pods, t).await;
        for (pod, s) in &scraped {
            out.pods.entry(pod.clone()).or_default().push(s.clone());
        }
        if n % 4 == 0 {
            if let Ok(s) = observe::service(&client, &cfg.namespace, &cfg.service).await {
                service = s;
            }
            let sent = counters.sent.load(Ordering::Relaxed);
            let kvs: Vec<f64> = scraped.values().map(|s| s.kv).collect();
            let sample = Sample {
                t,
                desired: service.desired,
                ready: pods.iter().filter(|p| p.ready && !p.deleting).count(),
                pods: pods.iter().filter(|p| !p.deleting).count(),
                arrival_rate: (sent - last_sent.0) as f64 / (t - last_sent.1).max(1e-3),
                in_flight: counters.in_flight.load(Ordering::Relaxed),
                kv_max: kvs.iter().copied().fold(0.0, f64::max),
                kv_mean: if kvs.is_empty() {
                    0.0
                } else {
                    kvs.iter().sum::<f64>() / kvs.len() as f64
                },
                decision: service.decision.clone(),
                late_per_second: service.late_per_second,
            };
            last_sent = (sent, t);
            on_sample(&sample);
            out.samples.push(sample);
            if let Some(done) = replay_done {
                let settled = cfg
                    .settle_to
                    .is_none_or(|want| service.desired <= want && pods.len() as i32 <= want);
                if settled || t - done > cfg.settle_timeout.as_secs_f64() {
                    out.settled = cfg.settle_to.is_some() && settled;
                    break;
                }
            }
        }
        n += 1;
    }
    out.events = events(&client, &cfg.namespace, &cfg.service, started_ms).await?;
    Ok(out)
}

/// The service's Events since the run started, oldest first.
pub async fn events(
    client: &Client,
    ns: &str,
    name: &str,
    since_ms: i64,
) -> Result<Vec<EventRecord>> {
    let list = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .context("listing Events")?;
    let mut v: Vec<EventRecord> = list
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| {
                r.kind.as_deref() == Some("InferenceService") && r.name.as_deref() == Some(name)
            })
        })
        .filter_map(|e| {
            let first = e
                .event_time
                .map(|t| t.0.as_millisecond())
                .or_else(|| e.metadata.creation_timestamp.map(|t| t.0.as_millisecond()))?;
            // An Event repeated by an earlier run (the same service driven again) is one series
            // whose first time is before this run: it counts from its last.
            let last = e
                .series
                .as_ref()
                .map_or(first, |s| s.last_observed_time.0.as_millisecond());
            let at = if first >= since_ms { first } else { last };
            (at >= since_ms).then(|| EventRecord {
                t: (at - since_ms) as f64 / 1000.0,
                reason: e.reason.unwrap_or_default(),
                note: e.note.unwrap_or_default(),
                count: e.series.map_or(1, |s| s.count.max(1) as u32),
            })
        })
        .collect();
    v.sort_by(|a, b| a.t.total_cmp(&b.t));
    Ok(v)
}
