//! Sending the trace: each request at its arrival time to the next ready pod (round robin, as a
//! Service spreads connections), sent elsewhere when a pod refuses it before accepting it (a
//! draining or vanished pod), and recorded with its time to first token.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use redline_sim::trace::Request;
use serde_json::json;

use crate::observe::ReadyPods;
use crate::transport::{Attempt, Target, Transport};
use crate::workload::prompt;

/// A request that got its whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// From the request's arrival in the trace (waits and retries included); `None` through
    /// the pod proxy, which does not stream.
    pub ttft: Option<f64>,
    pub latency: f64,
    pub pod: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutcome {
    pub arrival: f64,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    pub result: Result<Answer, String>,
    /// Times a pod refused it before accepting it (draining, gone) and it went to another.
    pub retries: u32,
}

/// Live counters for the observer's table.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub in_flight: AtomicU64,
}

/// How long a request may look for a pod that accepts it before it counts as failed.
const GIVE_UP: Duration = Duration::from_secs(120);

/// Sends every request at its arrival time after `start`; returns when all are answered.
pub async fn replay(
    transport: Transport,
    ready: ReadyPods,
    jobs: Vec<Request>,
    start: tokio::time::Instant,
    counters: Arc<Counters>,
) -> Vec<RequestOutcome> {
    let next = Arc::new(AtomicUsize::new(0));
    let tasks = jobs.into_iter().enumerate().map(|(id, job)| {
        let (transport, ready, next, counters) = (
            transport.clone(),
            ready.clone(),
            next.clone(),
            counters.clone(),
        );
        tokio::spawn(async move {
            tokio::time::sleep_until(start + Duration::from_secs_f64(job.arrival)).await;
            counters.sent.fetch_add(1, Ordering::Relaxed);
            counters.in_flight.fetch_add(1, Ordering::Relaxed);
            let out = one(&transport, &ready, &next, id, job).await;
            counters.in_flight.fetch_sub(1, Ordering::Relaxed);
            out
        })
    });
    join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("a request task panicked"))
        .collect()
}

fn pick(ready: &ReadyPods, next: &AtomicUsize) -> Option<Target> {
    let pods = ready.read().unwrap();
    (!pods.is_empty()).then(|| pods[next.fetch_add(1, Ordering::Relaxed) % pods.len()].clone())
}

async fn one(
    transport: &Transport,
    ready: &ReadyPods,
    next: &AtomicUsize,
    id: usize,
    job: Request,
) -> RequestOutcome {
    let arrived = Instant::now();
    let body = json!({
        "prompt": prompt(id, job.prompt_tokens),
        "max_tokens": job.output_tokens,
        "temperature": 0,
        "ignore_eos": true,
    });
    let mut retries = 0;
    let result = loop {
        if arrived.elapsed() > GIVE_UP {
            break Err(format!("no pod accepted it within {GIVE_UP:?}"));
        }
        let Some(target) = pick(ready, next) else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let tried = arrived.elapsed().as_secs_f64();
        match transport.complete(&target, &body).await {
            Attempt::Done {
                ttft,
                completion_tokens,
            } if completion_tokens == job.output_tokens as u64 => {
                break Ok(Answer {
                    ttft: ttft.map(|t| tried + t),
                    latency: arrived.elapsed().as_secs_f64(),
                    pod: target.pod,
                })
            }
            Attempt::Done {
                completion_tokens, ..
            } => {
                break Err(format!(
                    "{}: {completion_tokens} tokens, asked for {}",
                    target.pod, job.output_tokens
                ))
            }
            Attempt::Refused(_) => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Attempt::Failed(e) => break Err(e),
        }
    };
    RequestOutcome {
        arrival: job.arrival,
        prompt_tokens: job.prompt_tokens,
        output_tokens: job.output_tokens,
        result,
        retries,
    }
}
