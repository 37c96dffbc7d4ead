//! The discrete-event simulation of a fleet of engine pods: requests arrive from the trace and
//! are spread round-robin over the Ready pods (a Service), pods take a cold start to become
//! Ready, each pod's sidecar reads its engine every 250 ms through the sidecar's own pressure
//! model (and, for redline, applies the sidecar's own guard), and an autoscaler decides at its
//! own interval from what the pods report.
//!
//! Removing a pod the way Kubernetes does (HPA, KPA, oracle, static): it leaves the Service,
//! gets SIGTERM, finishes what it holds within the grace period and fails the rest. redline's
//! policy drains a pod first and removes it once it is empty.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use indicatif::ProgressBar;
use redline_api::{
    DeviceReading, EngineFlavor, EngineReading, GuardSettings, Limits, LimitsStatus, PressureReport,
};
use redline_autoscale::{PodPhase, PodSignals};
use redline_sidecar::guard::{
    max_kv_usage, Bounds, Guard, GuardConfig, Observation as GuardObservation,
};
use redline_sidecar::pressure::{ModelConfig, PressureModel};

use crate::engine::{Engine, Seq, Step};
use crate::profile::EngineProfile;
use crate::reversal_cap::Direction;
use crate::trace::Request;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slo {
    pub ttft_seconds: f64,
    /// A request's mean time between output tokens.
    pub itl_seconds: f64,
}

/// How the engines order their waiting requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Queue {
    /// Arrival order: vLLM's default, what the baselines' engines run.
    Fcfs,
    /// redline's engine given the TTFT objective: the most requests that can still meet it first
    /// (`redline_api::deadline`).
    Deadline,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    pub profile: EngineProfile,
    pub queue: Queue,
    pub cold_start_seconds: f64,
    pub slo: Slo,
    /// Pods Ready at time 0.
    pub initial_replicas: u32,
    /// GPUs in the cluster: pods beyond this many stay Unschedulable.
    pub cluster_replicas: u32,
    pub termination_grace_seconds: f64,
    pub sidecar_interval_seconds: f64,
    pub sample_interval_seconds: f64,
    /// Simulated time after the last arrival.
    pub tail_seconds: f64,
    pub guard: GuardSettings,
    /// What comes before this is a warm-up ([`crate::trace::with_warm_up`]): its requests,
    /// replica-seconds, scalings and events are not counted, and the outcome's times start
    /// here. The policies run through it, so the measured replay begins on a fleet, pools and
    /// memories that load has shaped, not on empty ones.
    pub measure_from_seconds: f64,
}

/// What an autoscaler sees of one pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodInfo {
    pub name: String,
    pub phase: PodPhase,
    pub draining: bool,
    pub signals: Option<PodSignals>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FleetView {
    pub desired: u32,
    /// Pods that count as replicas (not the ones terminating).
    pub pods: Vec<PodInfo>,
}

/// What an autoscaler asks for.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Command {
    pub replicas: u32,
    /// Take these pods out of the Service and let them finish (redline's drain).
    pub drain: Vec<String>,
    /// Remove these (drained) pods when lowering replicas; otherwise Kubernetes picks.
    pub remove: Vec<String>,
    /// Limit targets per pod (the guard moves beneath them).
    pub limits: Vec<(String, Limits)>,
}

pub trait Autoscaler {
    fn name(&self) -> String;
    fn interval_seconds(&self) -> f64;
    /// Whether the pods' sidecars run the fast guard.
    fn uses_guard(&self) -> bool {
        false
    }
    fn decide(&mut self, now: f64, view: &FleetView) -> Command;
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Starting,
    Unschedulable,
    Ready,
    Draining,
    Terminating { deadline: f64 },
    Gone,
}

struct Pod {
    name: String,
    created: f64,
    removed: Option<f64>,
    phase: Phase,
    engine: Engine,
    /// The step in flight.
    step: Option<Step>,
    pressure: PressureModel,
    guard: Guard,
    target: Limits,
    signals: Option<PodSignals>,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RequestRecord {
    pub arrival: f64,
    pub first_token: Option<f64>,
    pub finish: Option<f64>,
    pub output_tokens: u32,
    /// Refused for memory: larger than a replica's whole KV pool.
    pub refused: bool,
    /// Lost: its pod was killed before it finished.
    pub failed: bool,
}

impl RequestRecord {
    pub fn ttft(&self) -> Option<f64> {
        self.first_token.map(|f| f - self.arrival)
    }
    pub fn mean_itl(&self) -> Option<f64> {
        let (f, e) = (self.first_token?, self.finish?);
        Some(if self.output_tokens > 1 {
            (e - f) / (self.output_tokens - 1) as f64
        } else {
            0.0
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SamplePoint {
    pub t: f64,
    /// Pods that cost (starting, ready, draining, terminating).
    pub replicas: u32,
    pub ready: u32,
    /// Mean KV usage over pods holding an engine.
    pub kv_usage: f64,
    pub max_kv_usage: f64,
    pub waiting: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub name: String,
    pub requests: Vec<RequestRecord>,
    pub series: Vec<SamplePoint>,
    pub replica_seconds: f64,
    pub preemptions: u64,
    pub scale_actions: u32,
    /// When the desired replicas reversed direction, within the trace.
    pub reversals: Vec<f64>,
    pub guard_actions: u64,
    pub duration_seconds: f64,
    /// (time, replicas) at every change of the desired replicas.
    pub scale_events: Vec<(f64, u32)>,
    /// The load's work over the trace, in engine-seconds: every step's time less a lone
    /// sequence's step (what the policy's load share measures).
    pub load_seconds: f64,
}

impl Outcome {
    /// Drops the requests that arrived before `t` (the warm-up's) and moves every time `t`
    /// earlier, so the outcome reads as a replay that began at `t`. What is counted (replica-
    /// seconds, scalings, reversals, samples) was counted from `t` already.
    fn start_at(&mut self, t: f64) {
        self.requests.retain(|r| r.arrival >= t);
        for r in &mut self.requests {
            r.arrival -= t;
            r.first_token = r.first_token.map(|x| x - t);
            r.finish = r.finish.map(|x| x - t);
        }
        for s in &mut self.series {
            s.t -= t;
        }
        for r in &mut self.reversals {
            *r -= t;
        }
        for e in &mut self.scale_events {
            e.0 -= t;
        }
        self.duration_seconds = (self.duration_seconds - t).max(0.0);
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Arrival(usize),
    StepDone(usize),
    Ready(usize),
    Kill(usize),
    Sidecar,
    Control,
    Sample,
    /// The warm-up ends.
    MeasureFrom,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Ev {
    t: f64,
    seq: u64,
    kind: Kind,
}
impl Eq for Ev {}
impl PartialOrd for Ev {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ev {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.t.total_cmp(&o.t).then(self.seq.cmp(&o.seq))
    }
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    trace: &'a [Request],
    queue: BinaryHeap<Reverse<Ev>>,
    seq: u64,
    pods: Vec<Pod>,
    next_name: u32,
    rr: usize,
    /// Requests that arrived while no pod was Ready (the Service has no endpoints).
    unrouted: VecDeque<usize>,
    records: Vec<RequestRecord>,
    desired: u32,
    direction: Direction,
    out: Outcome,
    guard: bool,
    /// [`SimConfig::measure_from_seconds`], and the last arrival: what is counted lies between.
    measure_from: f64,
    last_arrival: f64,
    /// Preemptions and guard actions already counted when the measured replay began.
    uncounted_preemptions: u64,
    uncounted_guard_actions: u64,
}

impl<'a> Sim<'a> {
    fn at(&mut self, t: f64, kind: Kind) {
        self.seq += 1;
        self.queue.push(Reverse(Ev {
            t,
            seq: self.seq,
            kind,
        }));
    }

    fn live(&self) -> impl Iterator<Item = (usize, &Pod)> {
        self.pods.iter().enumerate().filter(|(_, p)| {
            matches!(
                p.phase,
                Phase::Starting | Phase::Unschedulable | Phase::Ready | Phase::Draining
            )
        })
    }

    fn create_pod(&mut self, now: f64, ready_now: bool) {
        let p = &self.cfg.profile;
        let name = format!("pod-{}", self.next_name);
        self.next_name += 1;
        let scheduled = self
            .live()
            .filter(|(_, p)| p.phase != Phase::Unschedulable)
            .count() as u32;
        let phase = if scheduled >= self.cfg.cluster_replicas {
            Phase::Unschedulable
        } else if ready_now {
            Phase::Ready
        } else {
            Phase::Starting
        };
        let id = self.pods.len();
        self.pods.push(Pod {
            name,
            created: now,
            removed: None,
            phase,
            engine: Engine::new(p).with_queue(self.cfg.queue, self.cfg.slo.ttft_seconds),
            step: None,
            pressure: PressureModel::new(ModelConfig::default()),
            guard: Guard::new(GuardConfig::default(), p.limits),
            target: p.limits,
            signals: None,
        });
        if phase == Phase::Starting {
            self.at(now + self.cfg.cold_start_seconds, Kind::Ready(id));
        }
    }

    fn kick(&mut self, now: f64, id: usize) {
        let cfg = self.cfg;
        let pod = &mut self.pods[id];
        if pod.step.is_some() || matches!(pod.phase, Phase::Gone | Phase::Starting) {
            return;
        }
        if let Some(step) = pod.engine.plan(&cfg.profile, now) {
            let t = now + step.seconds;
            pod.step = Some(step);
            self.at(t, Kind::StepDone(id));
        } else if let Phase::Terminating { .. } = pod.phase {
            self.remove(now, id);
        }
    }

    fn remove(&mut self, now: f64, id: usize) {
        let pod = &mut self.pods[id];
        for r in pod.engine.requests().collect::<Vec<_>>() {
            if self.records[r].finish.is_none() {
                self.records[r].failed = true;
            }
        }
        pod.phase = Phase::Gone;
        pod.removed = Some(now);
    }

    fn route(&mut self, now: f64, r: usize) {
        let ready: Vec<usize> = self
            .pods
            .iter()
            .enumerate()
            .filter(|(_, p)| p.phase == Phase::Ready)
            .map(|(i, _)| i)
            .collect();
        if ready.is_empty() {
            self.unrouted.push_back(r);
            return;
        }
        let id = ready[self.rr % ready.len()];
        self.rr = self.rr.wrapping_add(1);
        let q = &self.trace[r];
        let engine = &mut self.pods[id].engine;
        if !engine.fits(q.prompt_tokens, q.output_tokens) {
            self.records[r].refused = true;
            return;
        }
        engine.add(Seq::new(r, q.prompt_tokens, q.output_tokens).arriving(q.arrival));
        self.kick(now, id);
    }

    fn step_done(&mut self, now: f64, id: usize) {
        let Some(step) = self.pods[id].step.take() else {
            return;
        };
        if self.pods[id].phase == Phase::Gone {
            return;
        }
        if self.measured(now) {
            let lone = self.cfg.profile.lone_step_seconds();
            self.out.load_seconds += (step.seconds - lone).max(0.0);
        }
        let res = self.pods[id].engine.apply(&step);
        for r in res.first_tokens {
            if self.records[r].first_token.is_some() {
                continue;
            }
            self.records[r].first_token = Some(now);
            let engine = &mut self.pods[id].engine;
            engine.first_tokens_total += 1;
            // As redline's engine: late against the objective it was given, if any.
            if engine
                .ttft_objective
                .is_some_and(|o| now - self.trace[r].arrival > o)
            {
                engine.requests_late_total += 1;
            }
        }
        for r in res.finished {
            self.records[r].finish = Some(now);
        }
        self.kick(now, id);
    }

    fn sidecars(&mut self, now: f64) {
        for id in 0..self.pods.len() {
            self.sidecar(now, id);
        }
    }

    /// One pod's sidecar reads its engine, runs the guard and publishes its report.
    fn sidecar(&mut self, now: f64, id: usize) {
        let cfg = self.cfg;
        let pod = &mut self.pods[id];
        if !matches!(
            pod.phase,
            Phase::Ready | Phase::Draining | Phase::Terminating { .. }
        ) {
            pod.signals = None;
            return;
        }
        let e = &pod.engine;
        let reading = EngineReading {
            flavor: EngineFlavor::Redline,
            kv_usage_ratio: e.kv_usage(),
            kv_blocks_total: Some(e.total_blocks() as u64),
            kv_blocks_used: Some(e.used_blocks() as u64),
            kv_block_size: Some(cfg.profile.block_size as u64),
            requests_running: e.running() as u64,
            requests_waiting: e.waiting() as u64,
            preemptions_total: e.preemptions_total,
            limits: Some(e.limits),
            prompt_tokens_received_total: Some(e.prompt_tokens_received_total),
            generation_tokens_total: Some(e.generation_tokens_total),
            waiting_prompt_tokens: Some(e.waiting_tokens()),
            draining: Some(pod.phase == Phase::Draining),
            // The simulated Service knows of a drain at once: nothing comes to admit.
            lame_duck: Some(false),
            shutting_down: Some(false),
            requests_late_total: e.ttft_objective.map(|_| e.requests_late_total),
            first_tokens_total: Some(e.first_tokens_total),
            inter_token_seconds_total: Some(e.inter_token_seconds_total),
            inter_tokens_total: Some(e.inter_tokens_total),
            step_seconds_total: Some(e.step_seconds_total),
            steps_total: Some(e.steps_total),
            kv_blocks_freed_total: Some(e.kv_blocks_freed_total),
            max_kv_usage: Some(e.max_kv_usage),
        };
        let device = DeviceReading {
            backend: "none".into(),
            ..Default::default()
        };
        let derived = pod.pressure.observe(now, &reading, &device, &cfg.guard);
        if self.guard {
            // As the real sidecar does on its first tick.
            pod.engine.max_kv_usage = max_kv_usage(&cfg.guard);
            let min = Limits::new(1, cfg.profile.block_size);
            let obs = GuardObservation {
                derived: &derived,
                kv_usage: reading.kv_usage_ratio,
                running: reading.requests_running,
            };
            if let Some(c) = pod
                .guard
                .step(now, obs, Bounds::new(min, pod.target), &cfg.guard)
            {
                pod.engine.limits = clamp(c.limits, cfg.profile.limits);
                pod.guard.sync(pod.engine.limits);
                self.out.guard_actions += 1;
            }
        }
        let report = PressureReport {
            device,
            engine: Some(reading),
            derived,
            limits: LimitsStatus {
                target: Some(pod.target),
                min_num_seqs: 1,
                min_batched_tokens: cfg.profile.block_size,
                guard_limits: Some(pod.engine.limits),
                guard_reason: None,
                guard: cfg.guard,
                drain: pod.phase == Phase::Draining,
            },
            sample_age_seconds: Some(0.0),
            engine_reachable: true,
        };
        pod.signals = PodSignals::from_report(&report);
    }

    fn preemptions(&self) -> u64 {
        self.pods.iter().map(|p| p.engine.preemptions_total).sum()
    }

    fn view(&self) -> FleetView {
        FleetView {
            desired: self.desired,
            pods: self
                .live()
                .map(|(_, p)| PodInfo {
                    name: p.name.clone(),
                    phase: match p.phase {
                        Phase::Starting => PodPhase::Starting,
                        Phase::Unschedulable => PodPhase::Unschedulable,
                        _ => PodPhase::Ready,
                    },
                    draining: p.phase == Phase::Draining,
                    signals: p.signals.clone(),
                })
                .collect(),
        }
    }

    fn apply(&mut self, now: f64, cmd: Command) {
        let ceiling = self.cfg.profile.limits;
        for (name, l) in &cmd.limits {
            if let Some(p) = self.pods.iter_mut().find(|p| &p.name == name) {
                p.target = clamp(*l, ceiling);
                if !self.guard {
                    p.engine.limits = p.target;
                }
            }
        }
        for p in &mut self.pods {
            let named = cmd.drain.contains(&p.name);
            match p.phase {
                Phase::Ready if named => p.phase = Phase::Draining,
                Phase::Draining if !named => p.phase = Phase::Ready,
                _ => {}
            }
        }
        let grace = self.cfg.termination_grace_seconds;
        for name in &cmd.remove {
            if let Some(id) = self.pods.iter().position(|p| &p.name == name) {
                self.terminate(now, id, grace);
            }
        }
        let live = self.live().count() as u32;
        if cmd.replicas > live {
            for _ in live..cmd.replicas {
                self.create_pod(now, false);
            }
        } else if cmd.replicas < live {
            // As a ReplicaSet picks: unscheduled, then not ready, then the newest.
            let mut victims: Vec<(u8, f64, usize)> = self
                .live()
                .map(|(i, p)| {
                    let rank = match p.phase {
                        Phase::Unschedulable => 0,
                        Phase::Starting => 1,
                        Phase::Draining => 2,
                        _ => 3,
                    };
                    (rank, -p.created, i)
                })
                .collect();
            victims.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
            for &(_, _, id) in victims.iter().take((live - cmd.replicas) as usize) {
                self.terminate(now, id, grace);
            }
        }
        if cmd.replicas != self.desired {
            // Counted over the trace, as replica-seconds are: a scale-down in the tail
            // answers the trace's end, which a service that keeps running never sees.
            let reversed = self.direction.change(self.desired, cmd.replicas);
            if now >= self.measure_from {
                if reversed && self.measured(now) {
                    self.out.reversals.push(now);
                }
                self.out.scale_actions += 1;
                self.out.scale_events.push((now, cmd.replicas));
            }
            self.desired = cmd.replicas;
        }
        // Pods that just became Ready may take what waited for an endpoint.
        self.flush_unrouted(now);
    }

    /// Within what is counted: from the end of the warm-up to the last arrival.
    fn measured(&self, now: f64) -> bool {
        (self.measure_from..=self.last_arrival).contains(&now)
    }

    fn terminate(&mut self, now: f64, id: usize, grace: f64) {
        match self.pods[id].phase {
            Phase::Starting | Phase::Unschedulable => {
                self.pods[id].phase = Phase::Gone;
                self.pods[id].removed = Some(now);
            }
            Phase::Ready | Phase::Draining => {
                self.pods[id].phase = Phase::Terminating {
                    deadline: now + grace,
                };
                self.at(now + grace, Kind::Kill(id));
                self.kick(now, id);
                if self.pods[id].step.is_none() && self.pods[id].engine.is_idle() {
                    self.remove(now, id);
                }
            }
            _ => {}
        }
    }

    fn flush_unrouted(&mut self, now: f64) {
        if !self.pods.iter().any(|p| p.phase == Phase::Ready) {
            return;
        }
        while let Some(r) = self.unrouted.pop_front() {
            self.route(now, r);
        }
    }

    fn sample(&mut self, now: f64) {
        if now < self.measure_from {
            return;
        }
        let mut s = SamplePoint {
            t: now,
            ..Default::default()
        };
        let mut n = 0;
        for p in &self.pods {
            match p.phase {
                Phase::Gone | Phase::Unschedulable => continue,
                Phase::Starting => {}
                Phase::Ready => s.ready += 1,
                _ => {}
            }
            s.replicas += 1;
            if p.phase != Phase::Starting {
                let u = p.engine.kv_usage();
                s.kv_usage += u;
                s.max_kv_usage = s.max_kv_usage.max(u);
                s.waiting += p.engine.waiting() as u64;
                n += 1;
            }
        }
        if n > 0 {
            s.kv_usage /= n as f64;
        }
        s.waiting += self.unrouted.len() as u64;
        self.out.series.push(s);
    }
}

fn clamp(l: Limits, ceiling: Limits) -> Limits {
    Limits::new(
        l.max_num_seqs.min(ceiling.max_num_seqs),
        l.max_batched_tokens.clamp(1, ceiling.max_batched_tokens),
    )
}

/// Runs `trace` through a fleet steered by `scaler`.
pub fn simulate(
    trace: &[Request],
    cfg: &SimConfig,
    scaler: &mut dyn Autoscaler,
    progress: Option<&ProgressBar>,
) -> Outcome {
    // Replicas are paid for while the trace brings load; the simulation runs on for the tail so
    // the last requests finish, but what a policy holds after the trace ends is not its cost.
    let last_arrival = trace.last().map_or(0.0, |r| r.arrival);
    let end = last_arrival + cfg.tail_seconds;
    let mut sim = Sim {
        cfg,
        trace,
        queue: BinaryHeap::new(),
        seq: 0,
        pods: Vec::new(),
        next_name: 0,
        rr: 0,
        unrouted: VecDeque::new(),
        records: trace
            .iter()
            .map(|r| RequestRecord {
                arrival: r.arrival,
                output_tokens: r.output_tokens.max(1),
                ..Default::default()
            })
            .collect(),
        desired: cfg.initial_replicas,
        direction: Direction::default(),
        guard: scaler.uses_guard(),
        measure_from: cfg.measure_from_seconds,
        last_arrival,
        uncounted_preemptions: 0,
        uncounted_guard_actions: 0,
        out: Outcome {
            name: scaler.name(),
            requests: Vec::new(),
            series: Vec::new(),
            replica_seconds: 0.0,
            preemptions: 0,
            scale_actions: 0,
            reversals: Vec::new(),
            guard_actions: 0,
            duration_seconds: last_arrival,
            scale_events: Vec::new(),
            load_seconds: 0.0,
        },
    };
    for _ in 0..cfg.initial_replicas {
        sim.create_pod(0.0, true);
    }
    for (i, r) in trace.iter().enumerate() {
        sim.at(r.arrival, Kind::Arrival(i));
    }
    sim.at(0.0, Kind::Sidecar);
    sim.at(0.0, Kind::Control);
    sim.at(0.0, Kind::Sample);
    if cfg.measure_from_seconds > 0.0 {
        sim.at(cfg.measure_from_seconds, Kind::MeasureFrom);
    }
    let mut arrived = 0u64;
    while let Some(Reverse(ev)) = sim.queue.pop() {
        let now = ev.t;
        if now > end {
            break;
        }
        match ev.kind {
            Kind::Arrival(r) => {
                sim.route(now, r);
                arrived += 1;
                if let Some(pb) = progress {
                    if arrived.is_multiple_of(256) {
                        pb.set_position(arrived);
                    }
                }
            }
            Kind::StepDone(id) => sim.step_done(now, id),
            Kind::Ready(id) => {
                if sim.pods[id].phase == Phase::Starting {
                    sim.pods[id].phase = Phase::Ready;
                    // The sidecar has been reading the engine since it came up, before the
                    // kubelet saw it Ready: its report exists from the first moment. Without
                    // this, a policy tick at the same instant (a cold start that is a multiple
                    // of the tick) saw a Ready pod with no report, and the results depended on
                    // that alignment.
                    sim.sidecar(now, id);
                    sim.flush_unrouted(now);
                }
            }
            Kind::Kill(id) => {
                if matches!(sim.pods[id].phase, Phase::Terminating { .. }) {
                    sim.remove(now, id);
                }
            }
            Kind::Sidecar => {
                sim.sidecars(now);
                // Limits may have risen under a queue that had nothing to admit.
                for id in 0..sim.pods.len() {
                    sim.kick(now, id);
                }
                sim.at(now + cfg.sidecar_interval_seconds, Kind::Sidecar);
            }
            Kind::Control => {
                let view = sim.view();
                let cmd = scaler.decide(now, &view);
                sim.apply(now, cmd);
                sim.at(now + scaler.interval_seconds(), Kind::Control);
            }
            Kind::Sample => {
                sim.sample(now);
                sim.at(now + cfg.sample_interval_seconds, Kind::Sample);
            }
            Kind::MeasureFrom => {
                sim.uncounted_preemptions = sim.preemptions();
                sim.uncounted_guard_actions = sim.out.guard_actions;
            }
        }
    }
    if let Some(pb) = progress {
        pb.set_position(trace.len() as u64);
    }
    sim.out.preemptions = sim.preemptions() - sim.uncounted_preemptions;
    sim.out.guard_actions -= sim.uncounted_guard_actions;
    let from = cfg.measure_from_seconds;
    sim.out.replica_seconds = sim
        .pods
        .iter()
        .filter(|p| p.phase != Phase::Unschedulable)
        .map(|p| (p.removed.unwrap_or(end).min(last_arrival) - p.created.max(from)).max(0.0))
        .sum();
    for r in sim.unrouted.iter().copied().collect::<Vec<_>>() {
        sim.records[r].failed = true;
    }
    let mut out = sim.out;
    out.requests = sim.records;
    if from > 0.0 {
        out.start_at(from);
    }
    out
}
