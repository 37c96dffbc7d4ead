//! The autoscalers compared: redline's policy (the operator's own code), and the baselines as
//! their projects configure them.

use std::collections::VecDeque;

use redline_autoscale::{Observation, PodPhase, PodView, Policy, PolicyConfig};

use crate::fleet::{Autoscaler, Command, FleetView};

/// What a new leader starts from after a failover of the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// The old leader stopped (a rolling update of the operator, a drained node) and handed
    /// over its memory and its demand history, as the operator does in status as it stops.
    Stopped,
    /// The old leader was lost (its node died): the new one goes on from the memory the old
    /// one kept in status as it went, without the demand history.
    Memory,
    /// Nothing (the operator before `status.autoscalerMemory`).
    Fresh,
}

/// redline: the operator's policy every `interval`, the sidecars' guard every 250 ms.
pub struct Redline {
    policy: Policy,
    interval: f64,
    guard: bool,
    /// When the operator fails over (oldest last), and what the new leader starts from.
    failovers: Vec<f64>,
    handover: Handover,
    /// Seconds from a failover to the new leader's first decision (the Lease changing hands,
    /// the new leader's first list), and until when the fleet is left as it is.
    takeover_seconds: f64,
    idle_until: f64,
    /// Every decision that changed something, with its reason (`--explain`).
    pub log: Vec<String>,
    /// Where the log's clock starts (the end of a warm-up).
    log_origin: f64,
}

impl Redline {
    pub fn new(cfg: PolicyConfig, interval: f64) -> Self {
        Self {
            policy: Policy::new(cfg),
            interval,
            guard: true,
            failovers: Vec::new(),
            handover: Handover::Stopped,
            takeover_seconds: 0.0,
            idle_until: f64::NEG_INFINITY,
            log: Vec::new(),
            log_origin: 0.0,
        }
    }

    /// The log's times count from `seconds` (a warm-up's end); what it decided before is not
    /// logged.
    pub fn with_log_origin(mut self, seconds: f64) -> Self {
        self.log_origin = seconds;
        self
    }

    /// A new leader at each of `at` (seconds), starting from `handover`.
    pub fn with_failovers(mut self, mut at: Vec<f64>, handover: Handover) -> Self {
        at.sort_by(|a, b| b.total_cmp(a));
        self.failovers = at;
        self.handover = handover;
        self
    }

    /// The new leader decides nothing for `seconds` after each failover.
    pub fn with_takeover(mut self, seconds: f64) -> Self {
        self.takeover_seconds = seconds.max(0.0);
        self
    }

    /// The slow loop alone, to see what the sidecars' guard adds.
    pub fn without_guard(mut self) -> Self {
        self.guard = false;
        self
    }
}

impl Autoscaler for Redline {
    fn name(&self) -> String {
        if self.guard {
            "redline".into()
        } else {
            "redline, no guard".into()
        }
    }
    fn interval_seconds(&self) -> f64 {
        self.interval
    }
    fn uses_guard(&self) -> bool {
        self.guard
    }
    fn decide(&mut self, now: f64, view: &FleetView) -> Command {
        let obs = Observation {
            now,
            desired: view.desired,
            pods: view
                .pods
                .iter()
                .map(|p| PodView {
                    name: p.name.clone(),
                    phase: p.phase,
                    signals: p.signals.clone(),
                })
                .collect(),
        };
        while self.failovers.last().is_some_and(|&t| t <= now) {
            self.failovers.pop();
            let cfg = *self.policy.config();
            self.policy = match self.handover {
                Handover::Stopped => Policy::restore(cfg, &self.policy.handover(now), now),
                Handover::Memory => Policy::restore(cfg, &self.policy.memory(now), now),
                Handover::Fresh => Policy::new(cfg),
            };
            self.idle_until = now + self.takeover_seconds;
            self.log.push(format!(
                "{:6.1} min  failover         a new leader, from {}",
                (now - self.log_origin) / 60.0,
                match self.handover {
                    Handover::Stopped => "the old one's memory and demand history",
                    Handover::Memory => "the old one's memory",
                    Handover::Fresh => "nothing",
                }
            ));
        }
        if now < self.idle_until {
            // Nobody decides: the fleet stays as it is, drains and limits included.
            return Command {
                replicas: view.desired,
                drain: view
                    .pods
                    .iter()
                    .filter(|p| p.draining)
                    .map(|p| p.name.clone())
                    .collect(),
                ..Default::default()
            };
        }
        let d = self.policy.decide(&obs);
        if d.action != redline_autoscale::Action::Hold && now >= self.log_origin {
            self.log.push(format!(
                "{:6.1} min  {:<16} demand {:5.2}  forecast {:5.2}  {}",
                (now - self.log_origin) / 60.0,
                d.summary(),
                d.demand.replicas,
                d.forecast,
                d.reason
            ));
        }
        let remove = match &d.action {
            redline_autoscale::Action::ScaleDown { pods, .. } => pods.clone(),
            _ => Vec::new(),
        };
        Command {
            replicas: d.replicas,
            drain: d.draining,
            remove,
            limits: d.limits,
        }
    }
}

/// A fixed number of replicas.
pub struct Static(pub u32);

impl Autoscaler for Static {
    fn name(&self) -> String {
        format!("static {}", self.0)
    }
    fn interval_seconds(&self) -> f64 {
        60.0
    }
    fn decide(&mut self, _: f64, _: &FleetView) -> Command {
        Command {
            replicas: self.0,
            ..Default::default()
        }
    }
}

fn ready(view: &FleetView) -> impl Iterator<Item = &crate::fleet::PodInfo> {
    view.pods
        .iter()
        .filter(|p| p.phase == PodPhase::Ready && !p.draining)
}

/// HPA (or KEDA, which drives one) on `vllm:num_requests_waiting` with an average target of 5
/// per pod, as vLLM's production stack recipe sets it: polled every 15 s, scale-down
/// stabilized over 360 s (the recipe's cooldown), HPA's 10% tolerance and scale-up limit
/// (double, or +4 pods, per period).
pub struct HpaQueue {
    pub min: u32,
    pub max: u32,
    pub target_waiting: f64,
    pub poll_seconds: f64,
    pub cooldown_seconds: f64,
    recommendations: VecDeque<(f64, u32)>,
}

/// vLLM production-stack's HPA target: 5 requests waiting per pod.
pub const RECIPE_TARGET_WAITING: f64 = 5.0;

impl HpaQueue {
    /// At the recipe's target.
    pub fn new(min: u32, max: u32) -> Self {
        Self::with_target(min, max, RECIPE_TARGET_WAITING)
    }

    pub fn with_target(min: u32, max: u32, target_waiting: f64) -> Self {
        Self {
            min,
            max,
            target_waiting,
            poll_seconds: 15.0,
            cooldown_seconds: 360.0,
            recommendations: VecDeque::new(),
        }
    }
}

impl Autoscaler for HpaQueue {
    fn name(&self) -> String {
        format!("HPA queue>{}", self.target_waiting)
    }
    fn interval_seconds(&self) -> f64 {
        self.poll_seconds
    }
    fn decide(&mut self, now: f64, view: &FleetView) -> Command {
        let current = view.desired;
        let pods: Vec<_> = ready(view).filter_map(|p| p.signals.as_ref()).collect();
        let mut rec = current;
        if !pods.is_empty() {
            let avg = pods.iter().map(|s| s.waiting as f64).sum::<f64>() / pods.len() as f64;
            let ratio = avg / self.target_waiting;
            if (ratio - 1.0).abs() > 0.1 {
                rec = (pods.len() as f64 * ratio).ceil() as u32;
            }
        }
        rec = rec.clamp(self.min, self.max);
        if self.recommendations.is_empty() {
            // A fleet already running when the trace begins (as every policy starts): its HPA
            // has recommended the current size, and stabilizes a scale-down over that too.
            self.recommendations.push_back((now, current));
        }
        self.recommendations.push_back((now, rec));
        while self
            .recommendations
            .front()
            .is_some_and(|(t, _)| now - t > self.cooldown_seconds)
        {
            self.recommendations.pop_front();
        }
        let replicas = if rec > current {
            rec.min((current * 2).max(current + 4))
        } else {
            // Scale down to the highest recommendation of the stabilization window.
            self.recommendations
                .iter()
                .map(|r| r.1)
                .max()
                .unwrap_or(rec)
                .min(current)
        };
        Command {
            replicas: replicas.clamp(self.min, self.max),
            ..Default::default()
        }
    }
}

/// AIBrix's KPA (Knative's algorithm) on KV-cache usage with a target of 0.5 per pod: a 60 s
/// stable window, a 6 s panic window (10% of it), panic when the panic window asks for twice
/// the ready pods, no scale-down while panicking or for 60 s after.
pub struct Kpa {
    pub min: u32,
    pub max: u32,
    pub target: f64,
    pub stable_seconds: f64,
    pub panic_seconds: f64,
    samples: VecDeque<(f64, f64)>,
    panic_until: Option<f64>,
}

impl Kpa {
    pub fn new(min: u32, max: u32) -> Self {
        Self {
            min,
            max,
            target: 0.5,
            stable_seconds: 60.0,
            panic_seconds: 6.0,
            samples: VecDeque::new(),
            panic_until: None,
        }
    }

    fn mean(&self, now: f64, window: f64) -> f64 {
        let v: Vec<f64> = self
            .samples
            .iter()
            .filter(|(t, _)| now - t <= window)
            .map(|s| s.1)
            .collect();
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    }
}

impl Autoscaler for Kpa {
    fn name(&self) -> String {
        "KPA kv>0.5".into()
    }
    fn interval_seconds(&self) -> f64 {
        2.0
    }
    fn decide(&mut self, now: f64, view: &FleetView) -> Command {
        let ready_pods = ready(view).count() as u32;
        let total: f64 = ready(view)
            .filter_map(|p| p.signals.as_ref())
            .map(|s| s.kv_usage)
            .sum();
        self.samples.push_back((now, total));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now - t > self.stable_seconds)
        {
            self.samples.pop_front();
        }
        let stable = (self.mean(now, self.stable_seconds) / self.target).ceil() as u32;
        let panic = (self.mean(now, self.panic_seconds) / self.target).ceil() as u32;
        if ready_pods > 0 && panic >= 2 * ready_pods {
            self.panic_until = Some(now + self.stable_seconds);
        }
        let current = view.desired;
        let replicas = if self.panic_until.is_some_and(|t| now < t) {
            current.max(panic.max(stable))
        } else {
            self.panic_until = None;
            stable
        };
        Command {
            replicas: replicas.clamp(self.min, self.max),
            ..Default::default()
        }
    }
}

/// The clairvoyant oracle: per window, the fewest replicas that meet the SLO for the requests
/// arriving in it (found by simulating the window alone), each started one cold start ahead of
/// its window and kept through it.
///
/// With `lead_seconds` 0 it is the same sizing without foresight: each window's need is known
/// as the window begins, so its pods serve a cold start late; `spare` replicas on top of every
/// need are a uniform reserve for the bursts' first cold start. It is a reference for a policy
/// that only reacts, not a lower bound: a reserve held only where bursts come costs less.
#[derive(Debug, Clone)]
pub struct Oracle {
    pub min: u32,
    pub window_seconds: f64,
    pub cold_start_seconds: f64,
    /// How far ahead it knows the windows' needs: one cold start for the clairvoyant oracle.
    pub lead_seconds: f64,
    /// Replicas kept on top of every window's need.
    pub spare: u32,
    pub schedule: Vec<u32>,
}

impl Oracle {
    /// The most any window overlapping [from, to] needs.
    pub fn need(&self, from: f64, to: f64) -> u32 {
        let w = |t: f64| (t.max(0.0) / self.window_seconds) as usize;
        (w(from)..=w(to))
            .filter_map(|i| self.schedule.get(i).copied())
            .max()
            .unwrap_or(0)
    }

    /// The replicas it asks for at `now`: the most any window needs over the cold start up
    /// to as far ahead as it sees. For the clairvoyant oracle, from now until a pod started
    /// now is Ready; for the late one, the cold start just past (what it learns now, its pods
    /// serve a cold start from now); with no cold start and no lead, the window of `now`
    /// alone, so its schedule is followed as it is.
    pub fn asked(&self, now: f64) -> u32 {
        let seen = now + self.lead_seconds;
        self.need(seen - self.cold_start_seconds, seen)
            .max(self.min)
            + self.spare
    }
}

impl Autoscaler for Oracle {
    fn name(&self) -> String {
        let mut name = String::from("oracle");
        if self.lead_seconds < self.cold_start_seconds {
            name += ", a cold start late";
        }
        if self.spare > 0 {
            name += &format!(", +{}", self.spare);
        }
        name
    }
    fn interval_seconds(&self) -> f64 {
        1.0
    }
    fn decide(&mut self, now: f64, _: &FleetView) -> Command {
        Command {
            replicas: self.asked(now),
            ..Default::default()
        }
    }
}
