//! The slow loop's decision: replicas, a pod to drain, per-pod limit targets, and why.
//!
//! Every few seconds the caller hands [`Policy::decide`] what it sees (pods, their phase and
//! pressure, the desired replicas, the time) and gets one [`Decision`]. The policy keeps only the
//! demand history it needs for its forecast and windows; it has no clock and does no I/O, so
//! the operator and the simulator run the same decisions from the same inputs.
//!
//! - **Up early.** The forecast over the horizon (at least a pod's cold start) is the larger of
//!   the recent peak (bursts recur) and the current demand plus its trend. Pods still starting
//!   count as capacity, so a burst does not add a replica per tick while the first ones load.
//! - **Sized by the SLO.** With a TTFT objective, the error budget ([`crate::budget`]) decides
//!   the margin: none while no request is late (no trend either but the KV pools' filling,
//!   and a capped reserve for the bursts the sidecars measure), a cold-start margin once
//!   requests go late.
//! - **Down late and safe.** Only when the peak demand over the whole scale-down window
//!   (sizing lean, with the KV pools' rise that lean sizing adds: a drain at a peak of it is
//!   called back by the next rise) fits on fewer replicas with a margin (at most `max_step`
//!   at once), with every pod reporting fresh data for that whole window, nothing starting,
//!   and not within the window after a scale-up or after its pods turned Ready.
//!   A scale-down that reverses a scale-up waits four windows after the previous such one, so
//!   bursts that keep coming are ridden out on held replicas instead of paid for in reversals.
//! - **Down through drain.** The chosen pod leaves the Service, admits what the Service still
//!   sends in its lame duck, then takes no new requests and finishes what it holds; the
//!   replica count drops only once it is empty past its lame duck (or the drain timed out; the
//!   engine's SIGTERM drain finishes the rest). If demand comes back first, the drain is
//!   cancelled: no cold start paid for a pod that was still there.
//! - **Capacity-aware.** Pods the scheduler cannot place are reported, not piled onto.

use std::collections::VecDeque;

use redline_api::{Level, Limits};

use crate::budget::{BudgetConfig, ErrorBudget, Sizing};
use crate::demand::{burst_replicas, demand, Demand, DemandConfig, PodSignals, ReplicaCapacity};
use redline_api::slope;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyConfig {
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub capacity: ReplicaCapacity,
    pub target_utilization: f64,
    pub target_kv_usage: f64,
    /// How far ahead demand is forecast; at least a new pod's time to Ready.
    pub forecast_horizon_seconds: f64,
    /// Window the demand trend is fitted over.
    pub trend_window_seconds: f64,
    /// The trend is fitted to the demand averaged again over this window (0: to the demand
    /// itself). A burst's first seconds are steep, and are not a ramp.
    pub trend_smoothing_seconds: f64,
    /// Demand is averaged over this window: a burst shorter than the TTFT objective allows
    /// waits in the queue instead of buying replicas.
    pub demand_smoothing_seconds: f64,
    /// No scale-up sooner than this after the last scaling action of either direction.
    pub scale_up_cooldown_seconds: f64,
    /// Demand must fit on N-1 replicas for this long before one is drained; also the least
    /// time between a scale-up and the next scale-down.
    pub scale_down_window_seconds: f64,
    /// Most replicas added, or drained, in one decision.
    pub max_step: u32,
    /// Reports older than this are stale.
    pub stale_after_seconds: f64,
    pub backlog_drain_seconds: f64,
    /// After this long a drain gives way: the pod goes, its own SIGTERM drain finishes it.
    pub drain_timeout_seconds: f64,
    /// The limits each serving pod runs under (the sidecar's guard moves below them).
    pub pod_limits: Limits,
    /// The engines' TTFT objective (p99), when the service has one. With it, and engines that
    /// count their late requests, the policy sizes by the SLO's error budget
    /// ([`crate::budget`]) and keeps a reserve for the bursts the sidecars measure.
    pub ttft_objective_seconds: Option<f64>,
}

impl PolicyConfig {
    /// Decisions further apart than this leave a gap in the data (see
    /// [`GAP_IN_STALE_AFTER`]): no drain across one, and the error budget counts no more of it.
    fn max_gap_seconds(&self) -> f64 {
        GAP_IN_STALE_AFTER * self.stale_after_seconds
    }

    fn demand_config(&self) -> DemandConfig {
        DemandConfig {
            capacity: self.capacity,
            target_utilization: self.target_utilization,
            target_kv_usage: self.target_kv_usage,
            backlog_drain_seconds: self.backlog_drain_seconds,
        }
    }
}

/// Scale-down margin: N-1 replicas must carry the peak at this share of their target, so the
/// scale-up threshold is not met again by the same load.
const DOWN_MARGIN: f64 = 0.85;
/// The margin while sizing lean (nothing burns the error budget): the budget is the slack, and
/// a drain that leaves too little shows up as late requests, which switch the policy to
/// guarded sizing and [`DOWN_MARGIN`] again. Chosen with `redline-sim`: 0.9 held all 33
/// replays (docs/autoscaling.md, "A leaner margin for a drain while nothing burns"); 0.95
/// and 1.0 reversed twice within 10 minutes on one and two of them.
const DOWN_MARGIN_LEAN: f64 = 0.9;
/// Most the trend may add to the current demand, as a share of it.
const MAX_TREND_GAIN: f64 = 0.5;
/// Guarded sizing plans `1 + GUARD_MARGIN x sqrt(horizon / 60 s)` times the forecast: a reserve
/// must cover the load's swings over the lead time of new capacity, and swings grow with the
/// square root of it (safety stock in inventory control)...
const GUARD_MARGIN: f64 = 0.2;
/// ...up to a lead time of this many seconds. Past it they stop growing: the swings are bursts
/// of a minute or two that end by themselves (demand reverts to its mean, and the change of
/// such a process over a lead time levels off once it is longer than the bursts). With a cold
/// start of 180-240 s the uncapped margin (x1.35-1.40) bought replicas that came after the
/// burst they were for and were then held a whole window: prompts x2 at x1 reversed twice
/// within 10 minutes at 1.85-1.89x the oracle; capped, once, at 1.34-1.36x (docs/autoscaling.md,
/// "The guard margin stops growing"). Replays with cold starts up to this are unchanged.
const GUARD_MARGIN_MAX_LEAD_SECONDS: f64 = 120.0;
/// Guarded sizing takes the largest guarded forecast of this window: the catch-up sizes the
/// burst that made requests late, which is over by the time they are counted.
const GUARD_LOOKBACK_SECONDS: f64 = 120.0;
/// The burst reserve: replicas that would prefill the largest recent burst within this share
/// of the TTFT objective (the rest of it is the burst's own queueing).
const RESERVE_QUEUE_SHARE: f64 = 0.75;
/// The reserve is held this long after the burst...
const RESERVE_HOLD_SECONDS: f64 = 180.0;
/// ...and is at most one replica over the smallest fleet of that time, so a run of bursts
/// adds replicas one at a time as each proves the last one short, not all at once.
const RESERVE_MAX_OVER: f64 = 1.0;
/// The scale-down window grows up to this multiple of the configured one.
const MAX_HOLD_FACTOR: f64 = 4.0;
/// Scale-up tolerance: demand must exceed the replicas by this share (no flapping on noise).
const UP_TOLERANCE: f64 = 0.05;
/// Decisions further apart than this many times `stale_after_seconds` leave a gap in the
/// demand history: time in which a report would have gone stale unread, so load nobody saw.
const GAP_IN_STALE_AFTER: f64 = 2.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPhase {
    /// Scheduled, loading the model, not Ready yet.
    Starting,
    /// The scheduler cannot place it (no GPU left, say).
    Unschedulable,
    Ready,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PodView {
    pub name: String,
    pub phase: PodPhase,
    /// `None` when the pod has no sidecar report (unreachable, or none yet).
    pub signals: Option<PodSignals>,
}

/// What the caller sees at `now` (seconds on any monotonic clock).
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub now: f64,
    /// The replicas asked for now (the Deployment's spec).
    pub desired: u32,
    pub pods: Vec<PodView>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Hold,
    ScaleUp {
        from: u32,
        to: u32,
    },
    /// The pods stop taking requests; replicas unchanged until they are empty.
    Drain {
        pods: Vec<String>,
    },
    CancelDrain {
        pods: Vec<String>,
    },
    /// Drained pods are empty (or timed out): remove them.
    ScaleDown {
        from: u32,
        to: u32,
        pods: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub replicas: u32,
    pub action: Action,
    /// Limit targets per pod.
    pub limits: Vec<(String, Limits)>,
    /// The pods being drained: they take no new requests (not Ready, out of the Service) and
    /// finish the ones they hold, queued included.
    pub draining: Vec<String>,
    pub reason: String,
    pub demand: Demand,
    /// Demand forecast over the horizon, in replicas.
    pub forecast: f64,
    pub unschedulable: u32,
    /// Some pod is at or forecast to reach its KV redline, or preempting.
    pub near_redline: bool,
    /// Late requests over the ones the SLO allows, over the budget's window; `None` without
    /// a TTFT objective.
    pub error_budget_burn: Option<f64>,
}

impl Decision {
    /// A short line for `kubectl get` and events.
    pub fn summary(&self) -> String {
        match &self.action {
            Action::Hold => format!("hold {}", self.replicas),
            Action::ScaleUp { from, to } => format!("scale {from}->{to}"),
            Action::Drain { pods } => format!("drain {}", pods.join(",")),
            Action::CancelDrain { pods } => format!("keep {}", pods.join(",")),
            Action::ScaleDown { from, to, .. } => format!("scale {from}->{to}"),
        }
    }
}

/// A load in replicas as measured, averaged over the demand's smoothing window, and that
/// averaged again over the trend's smoothing window (what its trend is fitted to).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Averaged {
    raw: f64,
    smoothed: f64,
    trend_base: f64,
}

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    t: f64,
    demand: Averaged,
    /// The KV term's fill (see [`Demand::kv_fill`]).
    kv: Averaged,
    /// The burst reserve in replicas (0 without one), and the replicas asked for then.
    reserve: f64,
    desired: u32,
    /// The guarded forecast (see [`Sizing::Guarded`]).
    guarded: f64,
    /// Lean sizing's forecast: the demand and the KV pools' rise. The scale-down check takes
    /// its peak, so that a drain never goes under what lean sizing would scale up to.
    lean: f64,
    /// Every pod that should report did, with fresh data.
    complete: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct Draining {
    pod: String,
    since: f64,
}

/// The policy and the little it remembers between decisions.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    cfg: PolicyConfig,
    history: VecDeque<Sample>,
    last_up: Option<f64>,
    /// The last decision that saw a pod still starting: new capacity is tried for a whole
    /// window once it serves, not while it loads.
    last_starting: Option<f64>,
    last_down: Option<f64>,
    /// The last scale-down that followed a scale-up (a reversal).
    last_down_reversal: Option<f64>,
    draining: Vec<Draining>,
    /// The scale-down window in force: the configured one, doubled each time a scale-down is
    /// undone by a scale-up within it (bursts recur at about that interval), halved again
    /// after twice its length without any scaling.
    hold: f64,
    budget: ErrorBudget,
    sizing: Sizing,
}

impl Policy {
    pub fn new(cfg: PolicyConfig) -> Self {
        Self {
            cfg,
            history: VecDeque::new(),
            last_up: None,
            last_starting: None,
            last_down: None,
            last_down_reversal: None,
            draining: Vec::new(),
            hold: cfg.scale_down_window_seconds,
            // A gap in the data is a gap to the budget too: it counts no more of one.
            budget: ErrorBudget::new(BudgetConfig {
                max_interval_seconds: cfg.max_gap_seconds(),
                ..BudgetConfig::default()
            }),
            sizing: Sizing::Reactive,
        }
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// Takes a new configuration (an edited AutoscalingPolicy) and keeps the history.
    pub fn set_config(&mut self, cfg: PolicyConfig) {
        self.cfg = cfg;
        let base = cfg.scale_down_window_seconds;
        self.hold = self.hold.clamp(base, base * MAX_HOLD_FACTOR);
    }

    /// The scale-down window in force (see `hold`).
    pub fn scale_down_window(&self) -> f64 {
        self.hold
    }

    /// The pods being drained.
    pub fn draining(&self) -> impl Iterator<Item = &str> {
        self.draining.iter().map(|d| d.pod.as_str())
    }

    pub fn decide(&mut self, obs: &Observation) -> Decision {
        let cfg = self.cfg;
        let now = obs.now;
        let max = cfg.max_replicas.max(cfg.min_replicas);
        // Never to zero while a replica is allowed: with no pod there is no report of demand
        // to scale up from (scale from zero needs something that holds the first requests,
        // Knative's activator; redline has none).
        let min = cfg.min_replicas.max(1).min(max);
        // A drain whose pod is gone (deleted by someone else) is over.
        self.draining
            .retain(|d| obs.pods.iter().any(|p| p.name == d.pod));
        let stale = cfg.stale_after_seconds;
        let fresh = |p| fresh(p, stale);
        let reporting: Vec<&PodSignals> = obs
            .pods
            .iter()
            .filter(|p| p.phase == PodPhase::Ready)
            .filter_map(fresh)
            .collect();
        let complete = obs
            .pods
            .iter()
            .filter(|p| p.phase == PodPhase::Ready)
            .all(|p| fresh(p).is_some());
        let d = demand(reporting.iter().copied(), &cfg.demand_config());
        self.sizing = self.sizing_now(now, &reporting);
        let reserve = self.reserve(now, obs.desired, &reporting);
        let smoothed = self.remember(now, &d, complete, reserve, obs.desired);
        let forecast = self.forecast(now, smoothed);

        let starting = count(obs, PodPhase::Starting);
        if starting > 0 {
            self.last_starting = Some(now);
        }
        let unschedulable = count(obs, PodPhase::Unschedulable);
        let near_redline = reporting.iter().any(|s| {
            s.level == Level::Critical || s.preemptions_per_second > 0.0 || s.kv_usage >= 0.95
        });

        let mut out = Decision {
            replicas: obs.desired,
            action: Action::Hold,
            limits: Vec::new(),
            draining: Vec::new(),
            reason: String::new(),
            demand: d,
            forecast,
            unschedulable,
            near_redline,
            error_budget_burn: cfg.ttft_objective_seconds.map(|_| self.budget.burn()),
        };
        let desired = obs.desired;

        // Bounds first: the spec may have changed under us.
        if desired < min || desired > max {
            let to = desired.clamp(min, max);
            out.replicas = to;
            out.reason = format!("outside [{min}, {max}]");
            if to > desired {
                self.last_up = Some(now);
                out.action = Action::ScaleUp { from: desired, to };
            } else {
                self.last_down = Some(now);
                self.draining.clear();
            }
            return self.with_limits(out, obs);
        }

        let serving = desired.saturating_sub(self.draining.len() as u32);
        let wanted = needed(forecast);
        let since = |t: Option<f64>| t.map_or(f64::INFINITY, |t| now - t);
        let base = cfg.scale_down_window_seconds;
        while self.hold > base && since(self.last_up).min(since(self.last_down)) >= 2.0 * self.hold
        {
            self.hold = (self.hold / 2.0).max(base);
        }

        // Demand came back while pods drain: keep them (still there, warm, no cold start).
        if !self.draining.is_empty() && wanted > serving {
            let pods: Vec<String> = self.draining.drain(..).map(|d| d.pod).collect();
            out.reason = format!(
                "demand forecast {forecast:.2} replicas (now {smoothed:.2}, reserve {reserve:.2}, \
                     {} pods reporting; {}) needs {wanted}: drain cancelled",
                reporting.len(),
                self.sizing_text()
            );
            out.action = Action::CancelDrain { pods };
            return self.with_limits(out, obs);
        }

        if wanted > desired {
            if unschedulable > 0 {
                out.reason = format!(
                    "demand forecast {forecast:.2} needs {wanted} replicas, but {unschedulable} \
                     pod(s) cannot be scheduled: not adding more"
                );
                return self.with_limits(out, obs);
            }
            let cooldown = since(self.last_up).min(since(self.last_down));
            if desired < max && cooldown >= cfg.scale_up_cooldown_seconds {
                let to = wanted.min(desired + cfg.max_step.max(1)).min(max);
                // A reversal: the last action was a scale-down, within the window in force.
                if since(self.last_down) < self.hold.min(since(self.last_up)) {
                    self.hold = (self.hold * 2.0).min(base * MAX_HOLD_FACTOR);
                }
                self.last_up = Some(now);
                out.replicas = to;
                out.action = Action::ScaleUp { from: desired, to };
                out.reason = format!(
                    "demand forecast {forecast:.2} replicas over {:.0}s (now {:.2}, kv {:.0}%{}), \
                     {starting} starting; {}",
                    cfg.forecast_horizon_seconds,
                    smoothed,
                    d.kv_usage * 100.0,
                    self.parts_text(now, smoothed),
                    self.sizing_text()
                );
                return self.with_limits(out, obs);
            }
            out.reason = if desired >= max {
                format!("demand forecast {forecast:.2} needs {wanted}, at maxReplicas {max}")
            } else {
                format!("demand forecast {forecast:.2} needs {wanted}: cooling down")
            };
            return self.with_limits(out, obs);
        }

        // Drains in progress: remove the pods that are empty or out of time.
        if !self.draining.is_empty() {
            let timeout = cfg.drain_timeout_seconds;
            let (done, left): (Vec<Draining>, Vec<Draining>) =
                self.draining.drain(..).partition(|dr| {
                    let empty = obs
                        .pods
                        .iter()
                        .find(|p| p.name == dr.pod)
                        .and_then(fresh)
                        .is_some_and(|s| s.running == 0 && s.waiting == 0 && !s.lame_duck);
                    empty || now - dr.since >= timeout
                });
            self.draining = left;
            if done.is_empty() {
                out.reason = format!("draining {}", self.draining_names().join(", "));
                return self.with_limits(out, obs);
            }
            let to = desired - done.len() as u32;
            let pods: Vec<String> = done.into_iter().map(|d| d.pod).collect();
            if self.down_reverses() {
                self.last_down_reversal = Some(now);
            }
            self.last_down = Some(now);
            out.replicas = to;
            out.reason = format!("{} drained", pods.join(", "));
            out.action = Action::ScaleDown {
                from: desired,
                to,
                pods,
            };
            return self.with_limits(out, obs);
        }

        if desired > min {
            match self.down_blocker(now, desired, starting + unschedulable) {
                Err(why) => out.reason = why,
                Ok(peak) => {
                    // The fewest replicas that carry the window's peak with the margin, and
                    // never fewer than the forecast wants now: a drain under it would be
                    // cancelled at the next tick.
                    let fit = ((peak / self.down_margin()).ceil() as u32)
                        .max(wanted)
                        .max(min);
                    let k = desired.saturating_sub(fit).min(cfg.max_step.max(1));
                    let pods = pick_drain(obs, stale, k as usize);
                    if pods.is_empty() {
                        out.reason = "no pod to drain".into();
                    } else {
                        self.draining = pods
                            .iter()
                            .map(|p| Draining {
                                pod: p.clone(),
                                since: now,
                            })
                            .collect();
                        out.reason = format!(
                            "{} {peak:.2} over {:.0}s fits on {} replicas",
                            self.peak_name(),
                            self.hold,
                            desired - pods.len() as u32
                        );
                        out.action = Action::Drain { pods };
                    }
                }
            }
            return self.with_limits(out, obs);
        }
        out.reason = format!("demand {smoothed:.2} replicas, at minReplicas {min}");
        self.with_limits(out, obs)
    }

    fn draining_names(&self) -> Vec<String> {
        self.draining.iter().map(|d| d.pod.clone()).collect()
    }

    /// Why not scale down now, or `None` when it is safe.
    /// The window's peak demand when scaling down is safe now, else why not.
    fn down_blocker(&self, now: f64, desired: u32, not_ready: u32) -> Result<f64, String> {
        let cfg = &self.cfg;
        let w = self.hold;
        if not_ready > 0 {
            return Err(format!("{not_ready} pod(s) not ready"));
        }
        if self.last_up.is_some_and(|t| now - t < w) {
            return Err("within the scale-down window of a scale-up".into());
        }
        // The window after a scale-up runs from when its pods serve. Counted from the
        // decision, a cold start of it goes by while they load, and the replicas the
        // next burst needs are drained just before it comes.
        if self.last_starting.is_some_and(|t| now - t < w) {
            return Err("within the scale-down window of pods that just turned Ready".into());
        }
        if self
            .last_down
            .is_some_and(|t| now - t < cfg.scale_up_cooldown_seconds)
        {
            return Err("a scale-down just happened".into());
        }
        // A scale-down that reverses a scale-up may be undone by the next burst: two
        // reversals. Spacing such scale-downs by the longest window keeps to about one
        // reversal per half of it (one per 10 minutes at the default 300 s).
        let spacing = cfg.scale_down_window_seconds * MAX_HOLD_FACTOR;
        if self.down_reverses() && self.last_down_reversal.is_some_and(|t| now - t < spacing) {
            return Err(format!(
                "a scale-down now would reverse direction again within {spacing:.0}s"
            ));
        }
        let Some(first) = self.history.front() else {
            return Err("no data yet".into());
        };
        if now - first.t < w {
            return Err(format!("{:.0}s of data, need {w:.0}s", now - first.t));
        }
        // Decisions that did not happen (passes that failed while the API server was away, an
        // operator scaled to zero, a history handed over long ago) are missing data too: the
        // window must be covered from its start, or its peak may be one nobody saw.
        let max_gap = cfg.max_gap_seconds();
        let gap = self
            .history
            .iter()
            .zip(self.history.iter().skip(1))
            .filter(|(_, b)| now - b.t <= w)
            .map(|(a, b)| b.t - a.t)
            .fold(0.0, f64::max);
        if gap > max_gap {
            return Err(format!("a {gap:.0}s gap in the data within {w:.0}s"));
        }
        let window = self.history.iter().filter(|s| now - s.t <= w);
        if window.clone().any(|s| !s.complete) {
            return Err("missing or stale pressure reports in the window".into());
        }
        let k = self.guard_factor();
        // Sizing lean, k is 1 and each sample's lean forecast is its demand plus the KV rise.
        let lean = self.sizing == Sizing::Lean;
        let peak = window
            .map(|s| {
                let sized = if lean { s.lean } else { s.demand.smoothed * k };
                sized.max(s.reserve)
            })
            .fold(0.0, f64::max);
        let fits = (desired - 1) as f64 * self.down_margin();
        if peak > fits {
            return Err(format!(
                "{} {peak:.2} over {w:.0}s needs {desired}",
                self.peak_name()
            ));
        }
        Ok(peak)
    }

    /// The share of their target that N-1 replicas must carry the peak at, for a drain.
    fn down_margin(&self) -> f64 {
        match self.sizing {
            Sizing::Lean => DOWN_MARGIN_LEAN,
            _ => DOWN_MARGIN,
        }
    }

    /// What the scale-down check's peak is of, for a reason.
    fn peak_name(&self) -> &'static str {
        match self.sizing {
            Sizing::Lean => "peak demand and KV rise",
            _ => "peak demand",
        }
    }

    /// Whether a scale-down now would reverse the last scaling action.
    fn down_reverses(&self) -> bool {
        match (self.last_up, self.last_down) {
            (Some(up), Some(down)) => up > down,
            (Some(_), None) => true,
            _ => false,
        }
    }

    /// Records a raw demand sample and returns the smoothed demand.
    fn remember(
        &mut self,
        now: f64,
        d: &Demand,
        complete: bool,
        reserve: f64,
        desired: u32,
    ) -> f64 {
        // Time going backwards (a reset clock) would break every window: start afresh.
        if self.history.back().is_some_and(|s| s.t > now) {
            self.history.clear();
        }
        let demand = self.averaged(now, d.replicas, |s| s.demand);
        self.history.push_back(Sample {
            t: now,
            demand,
            kv: self.averaged(now, d.kv_fill, |s| s.kv),
            reserve,
            desired,
            guarded: 0.0,
            lean: 0.0,
            complete,
        });
        let keep = (self.cfg.scale_down_window_seconds * MAX_HOLD_FACTOR)
            .max(self.cfg.demand_smoothing_seconds)
            .max(self.cfg.forecast_horizon_seconds)
            .max(self.cfg.trend_window_seconds)
            .max(self.cfg.trend_smoothing_seconds);
        // Keep the newest sample at least `keep` old: with ticks that are never exactly
        // periodic, dropping everything older than `keep` would leave less than a whole
        // scale-down window, and the service would never scale down.
        while self.history.get(1).is_some_and(|s| now - s.t >= keep) {
            self.history.pop_front();
        }
        demand.smoothed
    }

    /// `raw`, and its averages over the windows before `now` of the load `of` picks.
    fn averaged(&self, now: f64, raw: f64, of: fn(&Sample) -> Averaged) -> Averaged {
        let cfg = &self.cfg;
        let smoothed = self.mean(now, cfg.demand_smoothing_seconds, raw, |s| of(s).raw);
        let trend_base = self.mean(now, cfg.trend_smoothing_seconds, smoothed, |s| {
            of(s).smoothed
        });
        Averaged {
            raw,
            smoothed,
            trend_base,
        }
    }

    /// The mean of `newest` and of `field` over the samples less than `window` old.
    fn mean(&self, now: f64, window: f64, newest: f64, field: impl Fn(&Sample) -> f64) -> f64 {
        let (sum, n) = self
            .history
            .iter()
            .filter(|s| now - s.t < window)
            .fold((newest, 1.0), |(a, n), s| (a + field(s), n + 1.0));
        sum / n
    }

    fn peak(&self, now: f64, window: f64) -> f64 {
        self.history
            .iter()
            .filter(|s| now - s.t <= window)
            .map(|s| s.demand.smoothed)
            .fold(0.0, f64::max)
    }

    /// How to size now: by load alone without a TTFT objective; with one, by the error
    /// budget, guarded while no engine counts its late requests.
    fn sizing_now(&mut self, now: f64, reporting: &[&PodSignals]) -> Sizing {
        if self.cfg.ttft_objective_seconds.is_none() {
            return Sizing::Reactive;
        }
        let counted = reporting.iter().any(|s| s.late_per_second.is_some());
        let rates = counted.then(|| {
            reporting.iter().fold((0.0, 0.0), |(l, f), s| {
                (
                    l + s.late_per_second.unwrap_or(0.0),
                    f + s.first_tokens_per_second.unwrap_or(0.0),
                )
            })
        });
        self.budget.observe(now, rates).unwrap_or(Sizing::Guarded)
    }

    /// How the forecast was sized, for the decision's reason.
    fn sizing_text(&self) -> String {
        let burn = self.budget.burn();
        match self.sizing {
            Sizing::Reactive => "sized by load".into(),
            Sizing::Lean => format!("lean, error budget burn {burn:.2}"),
            Sizing::Guarded => format!(
                "guarded x{:.2}, error budget burn {burn:.2}",
                self.guard_margin()
            ),
        }
    }

    /// What lean sizing added to the demand, for a scale-up's reason: the KV pools' rise and
    /// the burst reserve in force, where they count.
    fn parts_text(&self, now: f64, current: f64) -> String {
        let mut text = String::new();
        let rise = self.history.back().map_or(0.0, |s| s.lean - current);
        if self.sizing == Sizing::Lean && rise > 0.005 {
            text += &format!(", kv rise +{rise:.2}");
        }
        let reserve = self.reserve_in_force(now);
        if reserve > current {
            text += &format!(", reserve {reserve:.2}");
        }
        text
    }

    /// The largest burst reserve of the hold: the forecast never sizes under it.
    fn reserve_in_force(&self, now: f64) -> f64 {
        let hold = self.within_hold(RESERVE_HOLD_SECONDS);
        self.history
            .iter()
            .filter(|s| now - s.t <= hold)
            .map(|s| s.reserve)
            .fold(0.0, f64::max)
    }

    /// Replicas for the largest burst the sidecars measured lately (see
    /// [`RESERVE_QUEUE_SHARE`]), capped at [`RESERVE_MAX_OVER`] over the smallest fleet of the
    /// hold; 0 without a TTFT objective.
    fn reserve(&self, now: f64, desired: u32, reporting: &[&PodSignals]) -> f64 {
        let Some(ttft) = self.cfg.ttft_objective_seconds else {
            return 0.0;
        };
        let burst = burst_replicas(
            reporting.iter().copied(),
            &self.cfg.capacity,
            RESERVE_QUEUE_SHARE * ttft,
        )
        .unwrap_or(0.0);
        let low = self
            .history
            .iter()
            .filter(|s| now - s.t <= self.within_hold(RESERVE_HOLD_SECONDS))
            .map(|s| s.desired)
            .fold(desired, u32::min) as f64;
        // Just under what `needed` turns into one more replica than the cap.
        burst.min((low + RESERVE_MAX_OVER) * (1.0 + UP_TOLERANCE) - 0.01)
    }

    /// `seconds`, but no longer than the scale-down window in force: what the forecast holds,
    /// the scale-down check must see too, or a drain it allows is cancelled at the next tick.
    fn within_hold(&self, seconds: f64) -> f64 {
        seconds.min(self.hold)
    }

    /// What guarded sizing multiplies the forecast by.
    fn guard_margin(&self) -> f64 {
        let lead = self
            .cfg
            .forecast_horizon_seconds
            .min(GUARD_MARGIN_MAX_LEAD_SECONDS);
        1.0 + GUARD_MARGIN * (lead / 60.0).max(0.0).sqrt()
    }

    /// The guard margin while guarded, 1 otherwise.
    fn guard_factor(&self) -> f64 {
        if self.sizing == Sizing::Guarded {
            self.guard_margin()
        } else {
            1.0
        }
    }

    /// The demand the fleet is sized for over the horizon, by the sizing in force, and never
    /// under the burst reserve of the hold.
    fn forecast(&mut self, now: f64, current: f64) -> f64 {
        let trend = self.trend_forecast(now, current, MAX_TREND_GAIN);
        let guarded = trend * self.guard_margin();
        let lean = current + self.kv_rise(now, current);
        if let Some(s) = self.history.back_mut() {
            s.guarded = guarded;
            s.lean = lean;
        }
        let recent = |w: f64| self.history.iter().filter(move |s| now - s.t <= w);
        let sized = match self.sizing {
            Sizing::Reactive => trend,
            Sizing::Lean => self.trend_forecast(now, current, 0.0).max(lean),
            Sizing::Guarded => recent(self.within_hold(GUARD_LOOKBACK_SECONDS))
                .map(|s| s.guarded)
                .fold(guarded, f64::max),
        };
        sized.max(self.reserve_in_force(now))
    }

    /// The larger of the recent peak (bursts recur within a horizon) and the current demand
    /// carried forward by its trend. The trend is the slope of the demand averaged twice, and
    /// its gain is capped at `gain` times the current demand: a burst's first seconds have a
    /// steep slope that says little about the next minute.
    fn trend_forecast(&self, now: f64, current: f64, gain: f64) -> f64 {
        let cfg = &self.cfg;
        let trend = self.rise_per_second(now, |s| s.demand);
        let projected = current + (trend * cfg.forecast_horizon_seconds).min(current * gain);
        projected.max(self.peak(now, cfg.forecast_horizon_seconds))
    }

    /// What the KV pools' filling adds over the horizon while sizing lean, capped like the
    /// trend's gain. Lean sizing takes no trend because a burst of arrivals waits in the queue
    /// instead of buying replicas. The pools' fill is not a burst: it is the sequences in
    /// flight, a stock that grows while answers outlast the arrivals between them, and once
    /// the pools are full every new request waits for one to finish. A replica started when
    /// they are full comes a cold start late (docs/autoscaling.md, "A second workload").
    fn kv_rise(&self, now: f64, current: f64) -> f64 {
        let rise = self.rise_per_second(now, |s| s.kv) * self.cfg.forecast_horizon_seconds;
        rise.min(current * MAX_TREND_GAIN)
    }

    /// The slope over the trend window of the load `of` picks, averaged twice; 0 when falling.
    fn rise_per_second(&self, now: f64, of: fn(&Sample) -> Averaged) -> f64 {
        let pts = self
            .history
            .iter()
            .filter(|s| now - s.t <= self.cfg.trend_window_seconds)
            .map(|s| (s.t, of(s).trend_base));
        slope(pts).unwrap_or(0.0).max(0.0)
    }

    fn with_limits(&self, mut out: Decision, obs: &Observation) -> Decision {
        out.draining = self.draining_names();
        out.limits = obs
            .pods
            .iter()
            .filter(|p| p.phase != PodPhase::Unschedulable)
            .map(|p| (p.name.clone(), self.cfg.pod_limits))
            .collect();
        out
    }
}

fn count(obs: &Observation, phase: PodPhase) -> u32 {
    obs.pods.iter().filter(|p| p.phase == phase).count() as u32
}

/// Replicas that carry `forecast` (in replicas at target) with the scale-up tolerance.
fn needed(forecast: f64) -> u32 {
    (forecast / (1.0 + UP_TOLERANCE)).ceil().max(0.0) as u32
}

/// A pod's signals if they are recent enough to act on.
fn fresh(p: &PodView, stale_after: f64) -> Option<&PodSignals> {
    p.signals
        .as_ref()
        .filter(|s| s.sample_age_seconds <= stale_after)
}

/// The `k` ready pods with the least work in flight (ties: the name, for determinism).
fn pick_drain(obs: &Observation, stale_after: f64, k: usize) -> Vec<String> {
    let mut pods: Vec<(u64, &String)> = obs
        .pods
        .iter()
        .filter(|p| p.phase == PodPhase::Ready)
        .filter_map(|p| fresh(p, stale_after).map(|s| (s.running + s.waiting, &p.name)))
        .collect();
    pods.sort();
    pods.into_iter().take(k).map(|(_, n)| n.clone()).collect()
}

mod handover;
#[cfg(test)]
mod tests;

pub use handover::{PolicyMemory, SampleMemory};
