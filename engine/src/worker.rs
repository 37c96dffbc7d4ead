//! Runs the engine on its own OS thread. HTTP handlers talk to it through a command channel;
//! each request gets its own event channel back. The thread blocks on the command channel
//! when there is nothing to do (no spinning), and otherwise picks up new commands between
//! steps, which is what makes batching continuous.

use crate::engine::{Engine, Envelope, FinishReason, Request, Stats, TokenEvent};
use crate::kv_cache_manager::SeqId;
use crate::metrics::Metrics;
use crate::scheduler::Limits;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc as tmpsc;

#[derive(Debug)]
pub enum Event {
    Token(TokenEvent),
    /// The engine failed while running this request; nothing more will come.
    Failed(String),
}

enum Command {
    Add(Request, tmpsc::UnboundedSender<Event>),
    Abort(SeqId),
    SetLimits(Limits),
}

/// State readable without asking the engine thread.
pub struct Shared {
    pub stats: Mutex<Stats>,
    pub limits: Mutex<Limits>,
    pub envelope: Envelope,
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    next_id: Arc<AtomicU64>,
    pub shared: Arc<Shared>,
}

/// Aborts its request when dropped (client gone, handler cancelled) unless disarmed.
pub struct AbortOnDrop {
    id: SeqId,
    tx: mpsc::Sender<Command>,
    armed: bool,
}

impl AbortOnDrop {
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.tx.send(Command::Abort(self.id));
        }
    }
}

impl EngineHandle {
    /// Submits a request; events arrive on the returned channel until one is `finished`.
    pub fn submit(&self, mut req: Request) -> (tmpsc::UnboundedReceiver<Event>, AbortOnDrop) {
        req.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = req.id;
        let (etx, erx) = tmpsc::unbounded_channel();
        if self.tx.send(Command::Add(req, etx.clone())).is_err() {
            let _ = etx.send(Event::Failed("engine has stopped".into()));
        }
        let guard = AbortOnDrop {
            id,
            tx: self.tx.clone(),
            armed: true,
        };
        (erx, guard)
    }

    /// Sets new live limits (clamped into the envelope) and returns them at once, `None` if the
    /// engine thread is gone. They govern admission from the next step on; answering only
    /// after the step in progress (over a second for a long prefill on a busy CPU) would make
    /// the sidecar's guard as slow as the step it wants to protect the pool from.
    pub fn set_limits(&self, l: Limits) -> Option<Limits> {
        let applied = self.shared.envelope.clamp(l);
        // The newest wins in `shared` even if two callers race; the engine thread applies
        // them in the order they were sent, so it ends on the same value.
        let mut current = self.shared.limits.lock().expect("limits lock");
        self.tx.send(Command::SetLimits(applied)).ok()?;
        *current = applied;
        Some(applied)
    }

    pub fn stats(&self) -> Stats {
        *self.shared.stats.lock().expect("stats lock")
    }
    pub fn limits(&self) -> Limits {
        *self.shared.limits.lock().expect("limits lock")
    }
}

struct Timing {
    /// When the server received the request (the scheduler's deadline counts from here too).
    arrival: Instant,
    last: Option<Instant>,
}

pub fn spawn(engine: Engine, metrics: Arc<Metrics>) -> EngineHandle {
    let (tx, rx) = mpsc::channel();
    let shared = Arc::new(Shared {
        stats: Mutex::new(engine.stats()),
        limits: Mutex::new(engine.limits()),
        envelope: engine.envelope(),
    });
    metrics.set_state(&engine.stats(), engine.limits());
    let sh = shared.clone();
    // The step runs inside the compute pool (RAYON_NUM_THREADS threads, the server's
    // --threads): its ~150 parallel regions per step then fork from a pool thread that takes
    // part in the work, instead of each being injected from outside while this thread sleeps
    // (a wake-up and a sleep per matmul; measured as 18% of CPU samples at batch 1).
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("compute-{i}"))
        .build()
        .expect("build the compute thread pool");
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || run(engine, rx, sh, metrics, pool))
        .expect("spawn engine thread");
    EngineHandle {
        tx,
        next_id: Arc::new(AtomicU64::new(1)),
        shared,
    }
}

fn run(
    mut engine: Engine,
    rx: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    pool: rayon::ThreadPool,
) {
    let mut senders: HashMap<SeqId, (tmpsc::UnboundedSender<Event>, Timing)> = HashMap::new();
    loop {
        if engine.is_idle() {
            match rx.recv() {
                Ok(cmd) => handle(&mut engine, &mut senders, &shared, &metrics, cmd),
                Err(_) => return, // every handle dropped: the server is gone
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            handle(&mut engine, &mut senders, &shared, &metrics, cmd);
        }
        if !engine.is_idle() {
            let started = Instant::now();
            let result = pool.install(|| engine.step());
            metrics.observe_step(started.elapsed().as_secs_f64());
            match result {
                Ok(out) => deliver(&mut engine, &mut senders, &metrics, out.events),
                Err(e) => {
                    // A model error is a bug or a corrupt file, not a property of one request:
                    // fail everything in flight once, loudly, and keep serving new requests.
                    tracing::error!(error = %e, in_flight = senders.len(), "engine step failed");
                    for (id, (tx, _)) in senders.drain() {
                        engine.abort(id);
                        let _ = tx.send(Event::Failed(e.to_string()));
                    }
                }
            }
        }
        let stats = engine.stats();
        *shared.stats.lock().expect("stats lock") = stats;
        // The limits as last set (possibly not yet applied by this thread: they will be before
        // the next step), so /metrics never shows an older value after an answered PUT.
        metrics.set_state(&stats, *shared.limits.lock().expect("limits lock"));
    }
}

fn handle(
    engine: &mut Engine,
    senders: &mut HashMap<SeqId, (tmpsc::UnboundedSender<Event>, Timing)>,
    shared: &Shared,
    metrics: &Metrics,
    cmd: Command,
) {
    match cmd {
        Command::Add(req, tx) => {
            let (id, n, arrival) = (req.id, req.prompt.len(), req.arrived);
            match engine.add(req) {
                Ok(()) => {
                    metrics.prompt_tokens.inc_by(n as u64);
                    senders.insert(
                        id,
                        (
                            tx,
                            Timing {
                                arrival,
                                last: None,
                            },
                        ),
                    );
                }
                Err(e) => {
                    let _ = tx.send(Event::Failed(e.to_string()));
                }
            }
        }
        Command::Abort(id) => {
            if senders.remove(&id).is_some() && engine.abort(id) {
                tracing::debug!(id, "request aborted by client");
            }
        }
        Command::SetLimits(l) => {
            let applied = engine.set_limits(l);
            metrics.set_state(&engine.stats(), *shared.limits.lock().expect("limits lock"));
            tracing::info!(
                max_num_seqs = applied.max_num_seqs,
                max_batched_tokens = applied.max_batched_tokens,
                max_kv_usage = applied.max_kv_usage,
                "limits changed"
            );
        }
    }
}

fn deliver(
    engine: &mut Engine,
    senders: &mut HashMap<SeqId, (tmpsc::UnboundedSender<Event>, Timing)>,
    metrics: &Metrics,
    events: Vec<TokenEvent>,
) {
    let now = Instant::now();
    for ev in events {
        let id = ev.id;
        let finished = ev.finished;
        let Some((tx, t)) = senders.get_mut(&id) else {
            continue;
        };
        metrics.generation_tokens.inc();
        match t.last {
            None => metrics.observe_ttft((now - t.arrival).as_secs_f64(), engine.ttft_objective()),
            Some(last) => metrics.observe_itl((now - last).as_secs_f64()),
        }
        t.last = Some(now);
        let gone = tx.send(Event::Token(ev)).is_err();
        if let Some(reason) = finished {
            if reason != FinishReason::Abort {
                metrics
                    .request_latency
                    .observe((now - t.arrival).as_secs_f64());
            }
            senders.remove(&id);
        } else if gone {
            // The receiver is gone (client disconnected): free the blocks now.
            senders.remove(&id);
            engine.abort(id);
        }
    }
}
