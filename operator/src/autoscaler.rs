//! The slow loop: every few seconds, for each InferenceService whose pods run the sidecar,
//! read every pod's pressure (`crate::sidecars`), run redline's policy (`redline-autoscale`,
//! the code `redline-sim` measures) and apply what it decides: replicas through the scale
//! subresource, drains and limit targets through the sidecars (`PUT /v1/limits`), the drained
//! pod deleted once empty; an Event per action; its part of status (`crate::loop_status`) and
//! the same as per-service gauges on `/metrics`. The engine pods (as `crate::engine_pods`
//! sees them), HPAs and AutoscalingPolicies come from watches (`crate::watch`); services are
//! passed 16 at a time.
//!
//! With `autoscaling.enabled` false the loop only observes: status is written, nothing scaled.
//! The policy's memory is per service, and in status (`status.autoscalerMemory`,
//! `crate::memory`): a new leader goes on with the old one's error budget, windows and
//! drains. Not the demand history: it scales down only after a full window of fresh data.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use k8s_openapi::api::autoscaling::v1::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use redline_api::{GuardSettings, Limits, LimitsRequest, PressureReport};
use redline_autoscale::{
    default_target_kv_usage, default_target_utilization, Action, Decision as PolicyDecision,
    Observation, PodSignals, PodView, Policy, PolicyConfig, ReplicaCapacity,
};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::children;
use crate::conditions::{self, RESOURCES_AVAILABLE, SCALING_ACTIVE};
use crate::controller::{Context, Error};
use crate::crd::{AutoscalerMemory, AutoscalingPolicy, AutoscalingPolicySpec, InferenceService};
use crate::engine_pods::{
    admit_reports, by_service, resources_condition, serving, PodEntry, ENGINE_PODS,
};
use crate::log_once::LastError;
use crate::loop_status::{LoopStatus, Pass, Pressure};
use crate::memory;
use crate::metrics::set_or_remove;
use crate::scaling_active;
use crate::sidecars::{log_read_failures, ReadError, Sidecars};
use crate::validate::effective_replicas;
use crate::watch::{self, Cache};

/// The field manager of everything this loop writes.
pub const MANAGER: &str = "redline-autoscaler";
/// Services whose passes run at once (the reconciler's concurrency too): each pass is a few
/// API calls and one read per pod, mostly waiting.
const CONCURRENT_SERVICES: usize = 16;

/// The policy configuration for a service: the AutoscalingPolicy's numbers, the service's
/// bounds and limits.
pub fn policy_config(isvc: &InferenceService, p: &AutoscalingPolicySpec) -> PolicyConfig {
    let s = &isvc.spec;
    let (lo, hi) = (s.min_replicas.max(0) as u32, s.max_replicas.max(0) as u32);
    PolicyConfig {
        min_replicas: lo.min(hi),
        max_replicas: hi.max(lo),
        capacity: ReplicaCapacity {
            prompt_tokens_per_second: p.replica_capacity.prompt_tokens_per_second,
            generation_tokens_per_second: p.replica_capacity.generation_tokens_per_second,
            step_seconds: p.replica_capacity.step_seconds,
        },
        target_utilization: p
            .target_utilization
            .unwrap_or_else(|| default_target_utilization(s.ttft_objective_ms().is_some())),
        target_kv_usage: p
            .target_kv_usage
            .unwrap_or_else(|| default_target_kv_usage(p.replica_capacity.step_seconds.is_some())),
        forecast_horizon_seconds: p.forecast_horizon_seconds as f64,
        trend_window_seconds: p.trend_window_seconds as f64,
        trend_smoothing_seconds: p.trend_smoothing_seconds as f64,
        demand_smoothing_seconds: p.demand_smoothing_seconds as f64,
        scale_up_cooldown_seconds: p.scale_up_cooldown_seconds as f64,
        scale_down_window_seconds: p.scale_down_window_seconds as f64,
        max_step: p.max_step.max(1) as u32,
        stale_after_seconds: redline_autoscale::defaults::STALE_AFTER_SECONDS,
        backlog_drain_seconds: p.forecast_horizon_seconds.max(1) as f64,
        drain_timeout_seconds: p.drain_timeout_seconds as f64,
        pod_limits: pod_limits(isvc),
        ttft_objective_seconds: s.ttft_objective_ms().map(|ms| ms as f64 / 1000.0),
    }
}

/// The limits each serving pod runs under: the engine settings' (initial) sequences and token
/// budget; the sidecar's guard moves below them.
pub fn pod_limits(isvc: &InferenceService) -> Limits {
    let e = &isvc.spec.engine;
    let seqs = e
        .max_num_seqs
        .unwrap_or(e.max_num_seqs_ceiling)
        .clamp(0, e.max_num_seqs_ceiling);
    Limits::new(seqs.max(0) as u32, e.max_batched_tokens.max(1) as u32)
}

/// The longest one service's autoscaling pass may take. A pass takes
/// a second or two, but a call to an API server that accepts and never answers waits for the
/// client's read timeout (kube's: 295 s). What a cut-off pass left undone, the next one does
/// (sidecar targets, scale and status are compared with what they are).
const PASS_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a stopping leader waits for each service's last write: the process is given 10 s
/// to stop before it releases the Lease anyway.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the loop stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// This process stops while it leads (SIGTERM: a rolling update, a drained node): each
    /// policy's memory is written once more, with its demand history, before the Lease is
    /// released (`crate::memory`).
    HandOver,
    /// Leadership was lost: another leader may be writing already, so nothing is written.
    LeadershipLost,
}

/// A merge patch of an InferenceService's status, as the loop's field manager (the loop's part
/// of status after a pass, and a stopping leader's memory).
async fn merge_status(
    client: kube::Client,
    ns: &str,
    name: &str,
    patch: &serde_json::Value,
) -> Result<(), Error> {
    let pp = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    };
    Api::<InferenceService>::namespaced(client, ns)
        .patch_status(name, &pp, &Patch::Merge(patch))
        .await?;
    Ok(())
}

/// `f`'s result, or [`Error::Timeout`] once `limit` has passed.
async fn within<T>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or(Err(Error::Timeout(limit)))
}

/// The loop stops with leadership: a standby exports no service's gauges.
impl Drop for Autoscaler {
    fn drop(&mut self) {
        self.ctx.metrics.services.clear();
    }
}

/// A task that ends when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Default)]
struct ServiceState {
    policy: Option<Policy>,
    token: Option<String>,
    /// This service's pass.
    last_error: LastError,
    /// Ready pods whose sidecar did not answer at the last pass, with the error logged.
    unread: BTreeMap<String, String>,
}

pub struct Autoscaler {
    ctx: Arc<Context>,
    sidecars: Sidecars,
    started: Instant,
    /// `started` on the wall clock: the policies' times in status.
    clock: memory::Clock,
    services: HashMap<String, ServiceState>,
    /// Every HorizontalPodAutoscaler (`scaling_active::cache`).
    hpas: Cache<HorizontalPodAutoscaler>,
    /// Every pod of the operator's Deployments.
    pods: Cache<Pod>,
    /// Every AutoscalingPolicy, for the services that name one (`policyRef`).
    policies: Cache<AutoscalingPolicy>,
    /// The services the last pass recorded gauges of.
    recorded: HashSet<String>,
    /// The list of engine pods that stands in for their watch.
    list_error: LastError,
    /// The tasks that keep `hpas`, `pods` and `policies`: they live as long as the loop (it
    /// stops with leadership).
    _watches: [AbortOnDrop; 3],
}

impl Autoscaler {
    /// Starts the watches the loop reads (so within a Tokio runtime).
    pub fn new(ctx: Arc<Context>) -> Self {
        let (hpas, hpa_watch) = scaling_active::cache(ctx.watched());
        let (pods, pod_watch) = watch::cache(
            ctx.watched::<Pod>(),
            watcher::Config::default().labels(ENGINE_PODS),
            "the engine pods",
            "the loop lists them each pass",
        );
        let (policies, policy_watch) = watch::cache(
            ctx.watched::<AutoscalingPolicy>(),
            watcher::Config::default(),
            "the AutoscalingPolicies",
            "the loop gets each one a service names",
        );
        Self {
            sidecars: Sidecars::new(ctx.metrics.pressure_reads.clone()),
            ctx,
            started: Instant::now(),
            clock: memory::Clock {
                epoch: Timestamp::now(),
            },
            services: HashMap::new(),
            hpas,
            pods,
            policies,
            recorded: HashSet::new(),
            list_error: LastError::default(),
            _watches: [
                AbortOnDrop(tokio::spawn(hpa_watch)),
                AbortOnDrop(tokio::spawn(pod_watch)),
                AbortOnDrop(tokio::spawn(policy_watch)),
            ],
        }
    }

    /// Runs one pass over the services every `interval` until `stop`, then hands the policies
    /// over if it says so. A pass under way is finished first: cut off, it would lose the
    /// states of the services it holds.
    pub async fn run(
        mut self,
        store: Store<InferenceService>,
        interval: Duration,
        stop: impl std::future::Future<Output = Stop>,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                // A stop first: a pass then would make decisions nobody carries on.
                biased;
                why = &mut stop => {
                    if why == Stop::HandOver {
                        self.hand_over().await;
                    }
                    return;
                }
                _ = tick.tick() => {}
            }
            let Some(pods) = self.engine_pods().await else {
                continue;
            };
            let t0 = Instant::now();
            self.pass(store.state(), pods, PASS_TIMEOUT).await;
            self.ctx
                .metrics
                .autoscale_pass
                .observe(t0.elapsed().as_secs_f64());
        }
    }

    /// A stopping leader's last write: each policy's memory with its demand history, so that
    /// the next leader decides as this one would have.
    async fn hand_over(&self) {
        let now = self.started.elapsed().as_secs_f64();
        // Owned before the writes: a stream over borrows of the map is not Send.
        let memories: Vec<(String, AutoscalerMemory)> = self
            .services
            .iter()
            .filter_map(|(k, st)| {
                let m = st.policy.as_ref()?.handover(now);
                Some((k.clone(), memory::to_status(&m, self.clock, now)))
            })
            .collect();
        let writes = memories.into_iter().map(|(k, m)| {
            let client = self.ctx.client.clone();
            async move {
                let (ns, name) = k.split_once('/').unwrap_or_default();
                let patch = json!({"status": {"autoscalerMemory": m}});
                let r = within(HANDOVER_TIMEOUT, merge_status(client, ns, name, &patch)).await;
                if let Err(e) = &r {
                    warn!(isvc = %k, "handing the autoscaling policy's memory over: {e}");
                }
                r.is_ok()
            }
        });
        let done: Vec<bool> = stream::iter(writes)
            .buffer_unordered(CONCURRENT_SERVICES)
            .collect()
            .await;
        let written = done.iter().filter(|&&ok| ok).count();
        info!(
            "stopping: handed {written} of {} services' autoscaling memory over, with their demand history",
            done.len()
        );
    }

    /// Every engine pod by service key: from the watch, or, until it has its first list and
    /// whenever it failed since (until it has listed afresh: `watch::cache`), from a list.
    /// Never stale pods: a pass on them could scale on pods as they were. `None` (logged
    /// once) when the list fails too: no service is scaled.
    async fn engine_pods(&mut self) -> Option<HashMap<String, Vec<Pod>>> {
        if let Some(pods) = self.pods.current() {
            return Some(by_service(pods.iter().map(|p| p.as_ref())));
        }
        let api: Api<Pod> = self.ctx.watched();
        let listed = within(PASS_TIMEOUT, async {
            Ok(api.list(&ListParams::default().labels(ENGINE_PODS)).await?)
        })
        .await;
        match listed {
            Ok(list) => {
                if self.list_error.worked() {
                    info!("autoscaling loop: listing engine pods works again");
                }
                Some(by_service(list.items.iter()))
            }
            Err(e) => {
                if self.list_error.failed(&e.to_string()) {
                    warn!("autoscaling loop: listing engine pods (no service is scaled until it works): {e}");
                }
                None
            }
        }
    }

    /// One pass over the services, [`CONCURRENT_SERVICES`] at a time, each cut off after
    /// `limit`. Services are independent (each its own policy, pods and sidecars), and one
    /// service's slow calls (a sidecar that never answers costs its 2 s timeout, a stuck API
    /// call the whole `limit`) must not delay every other service's decisions by as much:
    /// one after the other, a few such services would stretch a 5 s loop to a minute.
    async fn pass(
        &mut self,
        isvcs: Vec<Arc<InferenceService>>,
        mut pods: HashMap<String, Vec<Pod>>,
        limit: Duration,
    ) {
        let keys: HashSet<String> = isvcs.iter().map(|i| key(i)).collect();
        self.services.retain(|k, _| keys.contains(k));
        let any_enabled = isvcs
            .iter()
            .any(|i| i.spec.autoscaling.as_ref().is_some_and(|a| a.enabled));
        // Until the watch has its first list, the check waits (logged by the watch).
        let mut hpas = if any_enabled {
            scaling_active::from_cache(&self.hpas).unwrap_or_default()
        } else {
            HashMap::new()
        };
        let mut work = Vec::new();
        for isvc in isvcs {
            if !isvc.spec.sidecar.enabled || isvc.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let k = key(&isvc);
            let mine = pods.remove(&k).unwrap_or_default();
            let hpa = hpas.remove(&k);
            let enabled = isvc.spec.autoscaling.as_ref().is_some_and(|a| a.enabled);
            if mine.is_empty() && !enabled && !reports_stale_condition(&isvc) {
                continue; // Nothing to read, nothing to decide, nothing to clear.
            }
            // Each service's state goes with its pass and comes back with it.
            let st = self.services.remove(&k).unwrap_or_default();
            work.push((k, isvc, mine, hpa, st));
        }
        // The gauges of services not passed any more (deleted, or nothing to read).
        let passed: HashSet<String> = work.iter().map(|w| w.0.clone()).collect();
        for k in self.recorded.difference(&passed) {
            if let Some((ns, name)) = k.split_once('/') {
                self.ctx.metrics.services.forget(ns, name);
            }
        }
        self.recorded = passed;
        let this = &*self;
        let done: Vec<(String, ServiceState)> = stream::iter(work)
            .map(|(k, isvc, mine, hpa, mut st)| async move {
                let r = within(limit, this.service(&mut st, &isvc, mine, hpa.as_deref())).await;
                match r {
                    Ok(()) => {
                        if st.last_error.worked() {
                            info!(isvc = %k, "autoscaling loop working again");
                        }
                    }
                    Err(e) => {
                        this.ctx.metrics.errors.with_label_values(&[e.kind()]).inc();
                        let msg = e.to_string();
                        if st.last_error.failed(&msg) {
                            warn!(isvc = %k, kind = e.kind(), "autoscaling loop: {msg}");
                        }
                    }
                }
                (k, st)
            })
            .buffer_unordered(CONCURRENT_SERVICES)
            .collect()
            .await;
        self.services.extend(done);
    }

    async fn token(
        &self,
        st: &mut ServiceState,
        isvc: &InferenceService,
        ns: &str,
    ) -> Result<Option<String>, Error> {
        if st.token.is_some() {
            return Ok(st.token.clone());
        }
        let secrets: Api<Secret> = Api::namespaced(self.ctx.client.clone(), ns);
        let token = secrets
            .get_opt(&children::token_secret_name(isvc))
            .await?
            .and_then(|s| s.data)
            .and_then(|d| d.get("token").cloned())
            .and_then(|b| String::from_utf8(b.0).ok());
        st.token = token.clone();
        Ok(token)
    }

    async fn policy_spec(
        &self,
        isvc: &InferenceService,
        ns: &str,
    ) -> Result<Option<AutoscalingPolicySpec>, Error> {
        let a = isvc.spec.autoscaling.clone().unwrap_or_default();
        if let Some(r) = &a.policy_ref {
            // Missing: the reconciler reports it (Degraded); nothing to scale by meanwhile.
            // From the watch while it is current: every service sharing a policy read it
            // each pass (500 services at the 5 s interval: 100 GETs a second). A GET until
            // its first list, and while it fails.
            let key = ObjectRef::new(r).within(ns);
            if let Some(p) = self.policies.current_get(&key) {
                return Ok(p.map(|p| p.spec.clone()));
            }
            let policies: Api<AutoscalingPolicy> = Api::namespaced(self.ctx.client.clone(), ns);
            return Ok(policies.get_opt(r).await?.map(|p| p.spec));
        }
        Ok(Some(a.policy.unwrap_or_default()))
    }

    async fn service(
        &self,
        st: &mut ServiceState,
        isvc: &InferenceService,
        pods: Vec<Pod>,
        hpas: Option<&[String]>,
    ) -> Result<(), Error> {
        let ns = isvc.namespace().ok_or(Error::MissingKey("namespace"))?;
        let k = key(isvc);
        let scaling = scaling_active::condition(isvc, hpas);
        let Some(token) = self.token(st, isvc, &ns).await? else {
            // The reconciler has not created it yet, or will not: an invalid spec gets no
            // children. With no pod there is nothing to read, and status can say why nothing
            // scales.
            if pods.is_empty() {
                let pass = Pass {
                    entries: &[],
                    reports: &[],
                    pressure: Pressure::default(),
                    decision: None,
                    memory: memory::without_policy(isvc),
                    conditions: [resources_condition(&pods), scaling],
                };
                self.write_status(isvc, &ns, &pods, pass).await?;
            }
            return Ok(());
        };
        let spec = if scaling.ok == Some(true) {
            self.policy_spec(isvc, &ns).await?
        } else {
            None
        };
        let scaling = scaling_active::with_policy(scaling, isvc, spec.is_some());
        let now = self.started.elapsed().as_secs_f64();
        let cfg = spec.as_ref().map(|p| policy_config(isvc, p));
        // Before the drains are read off it: a new leader's policy holds the old one's.
        match cfg {
            Some(cfg) if st.policy.is_none() => {
                st.policy = Some(self.first_policy(isvc, &k, cfg, now));
            }
            None => st.policy = None,
            Some(_) => {}
        }
        let draining: Vec<String> = st
            .policy
            .as_ref()
            .map(|p| p.draining().map(String::from).collect())
            .unwrap_or_default();
        let mut entries: Vec<PodEntry> = pods
            .iter()
            .filter_map(|p| PodEntry::new(p, &draining))
            .collect();
        let reads = self.sidecars.pressures(&entries, &token).await;
        // A refused token means the Secret was recreated: read it again next pass (only then:
        // an unreachable pod is no reason to re-read it).
        if reads.iter().any(|r| r == &Err(ReadError::Unauthorized)) {
            st.token = None;
        }
        log_read_failures(&mut st.unread, &k, &entries, &reads);
        let mut reports: Vec<Option<PressureReport>> = reads.into_iter().map(Result::ok).collect();
        let orphans = admit_reports(&mut entries, &mut reports, &draining);

        let (decision, memory) =
            if let (Some(p), Some(cfg), Some(policy)) = (&spec, cfg, st.policy.as_mut()) {
                let obs = Observation {
                    now,
                    desired: effective_replicas(&isvc.spec).max(0) as u32,
                    pods: entries
                        .iter()
                        .zip(&reports)
                        .map(|(e, r)| PodView {
                            name: e.name.clone(),
                            phase: e.phase,
                            signals: r.as_ref().and_then(PodSignals::from_report),
                        })
                        .collect(),
                };
                if *policy.config() != cfg {
                    policy.set_config(cfg);
                }
                let d = policy.decide(&obs);
                let m = memory::to_status(&policy.memory(now), self.clock, now);
                self.apply(isvc, &ns, &d, &entries, &reports, &token, p)
                    .await?;
                (Some(d), Some(m))
            } else {
                (None, memory::without_policy(isvc))
            };
        self.cancel_orphaned_drains(
            isvc,
            &entries,
            &reports,
            &orphans,
            decision.as_ref(),
            &token,
        )
        .await;
        let pass = Pass {
            entries: &entries,
            reports: &reports,
            pressure: Pressure::of(&reports, isvc.spec.ttft_objective_ms().is_some()),
            decision: decision.as_ref(),
            memory,
            conditions: [resources_condition(&pods), scaling],
        };
        self.write_status(isvc, &ns, &pods, pass).await
    }

    /// A service's policy in this process: going on from the memory in its status (a new
    /// leader's), or new. `isvc` is the controller's store's: its first list is a quorum read
    /// made once this process leads, after the old leader stopped writing.
    fn first_policy(
        &self,
        isvc: &InferenceService,
        k: &str,
        cfg: PolicyConfig,
        now: f64,
    ) -> Policy {
        let Some(m) = isvc
            .status
            .as_ref()
            .and_then(|s| s.autoscaler_memory.as_ref())
        else {
            return Policy::new(cfg);
        };
        let memory = memory::from_status(m, self.clock, now);
        // How long nobody decided: from the old leader's last decision to this one.
        let gap = memory
            .history
            .last()
            .map_or_else(|| "unknown".into(), |s| format!("{:.1}s", s.age));
        info!(
            "{k}: autoscaling goes on from status.autoscalerMemory (last scale-up {}, last \
             scale-down {}, {} pod(s) draining, {} late requests in the error budget, {} \
             demand samples handed over, the last decision {gap} ago)",
            m.last_scale_up_time.as_deref().unwrap_or("none"),
            m.last_scale_down_time.as_deref().unwrap_or("none"),
            m.draining.len(),
            m.error_budget.iter().map(|s| s.late).sum::<i64>(),
            memory.history.len(),
        );
        let from = if memory.history.is_empty() {
            "memory"
        } else {
            "memory_and_history"
        };
        self.ctx
            .metrics
            .policies_restored
            .with_label_values(&[from])
            .inc();
        Policy::restore(cfg, &memory, now)
    }

    /// The service's gauges (`ServiceGauges`) from this pass: what `write_status` writes,
    /// with the pods that serve.
    fn record(
        &self,
        isvc: &InferenceService,
        pods: &[Pod],
        pressure: Pressure,
        d: Option<&PolicyDecision>,
    ) {
        let (ns, name) = (isvc.namespace().unwrap_or_default(), isvc.name_any());
        let g = &self.ctx.metrics.services;
        let desired = d.map_or(effective_replicas(&isvc.spec).max(0) as u32, |d| d.replicas);
        // In the Service, as a Deployment counts them: a draining pod is not.
        let ready = pods.iter().filter(|p| serving(p)).count();
        let summary = pressure.summary;
        for (gauge, v) in [
            (&g.desired, Some(desired as f64)),
            (&g.ready, Some(ready as f64)),
            (&g.demand, d.map(|d| d.demand.replicas)),
            (&g.forecast, d.map(|d| d.forecast)),
            (&g.kv_usage, summary.map(|s| s.0)),
            (&g.kv_usage_max, summary.map(|s| s.1)),
            (&g.late, pressure.late),
            (&g.burn, d.and_then(|d| d.error_budget_burn)),
        ] {
            set_or_remove(gauge, &ns, &name, v);
        }
    }

    /// Serves again every pod left draining by no drain of this operator's (`orphans`, from
    /// `admit_reports`), unless the decision just drained it itself. With a policy, `apply`
    /// has already told the sidecar (the pod is not among the decision's drains); without
    /// one, this does. An Event and a log line each.
    async fn cancel_orphaned_drains(
        &self,
        isvc: &InferenceService,
        entries: &[PodEntry],
        reports: &[Option<PressureReport>],
        orphans: &[String],
        d: Option<&PolicyDecision>,
        token: &str,
    ) {
        for (e, r) in entries.iter().zip(reports) {
            let Some(r) = r else { continue };
            let n = &e.name;
            if !orphans.contains(n) || d.is_some_and(|d| d.draining.contains(n)) {
                continue;
            }
            if d.is_none() {
                let target = r.limits.target.or(r.engine.as_ref().and_then(|e| e.limits));
                let (Some(ip), Some(l)) = (&e.ip, target) else {
                    continue;
                };
                let body = LimitsRequest::target(l, r.limits.guard, false);
                if !self.sidecars.put_limits(ip, token, &body).await {
                    continue;
                }
            }
            self.ctx
                .event(
                    isvc,
                    EventType::Normal,
                    "DrainCancelled",
                    "CancelDrain",
                    format!(
                        "{n} was left draining by no drain of this operator's (an earlier \
                         leader's, or one under way when autoscaling was turned off): it serves \
                         again"
                    ),
                )
                .await;
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn apply(
        &self,
        isvc: &InferenceService,
        ns: &str,
        d: &PolicyDecision,
        entries: &[PodEntry],
        reports: &[Option<PressureReport>],
        token: &str,
        p: &AutoscalingPolicySpec,
    ) -> Result<(), Error> {
        let name = isvc.name_any();
        let desired = effective_replicas(&isvc.spec).max(0) as u32;
        if d.action != Action::Hold {
            self.ctx
                .metrics
                .scaling_decisions
                .with_label_values(&[action_label(&d.action)])
                .inc();
            info!(isvc = %key(isvc), decision = %d.summary(), "{}", d.reason);
        } else {
            // Why nothing happens (e.g. no scale-down yet) is asked often; each pass, on demand.
            debug!(isvc = %key(isvc), "hold: {}", d.reason);
        }
        // Limits and drains first: a scale-down removes only a pod already empty.
        let guard = GuardSettings {
            redline_ratio: p.guard_kv_usage,
            ..GuardSettings::default()
        };
        for (e, r) in entries.iter().zip(reports) {
            let (Some(ip), Some(r)) = (&e.ip, r) else {
                continue;
            };
            let Some(&(_, l)) = d.limits.iter().find(|(pn, _)| *pn == e.name) else {
                continue;
            };
            let drain = d.draining.contains(&e.name);
            let current = &r.limits;
            if current.target == Some(l) && current.drain == drain && current.guard == guard {
                continue;
            }
            let body = LimitsRequest::target(l, guard, drain);
            self.sidecars.put_limits(ip, token, &body).await;
        }
        if d.replicas != desired {
            let isvcs: Api<InferenceService> = Api::namespaced(self.ctx.client.clone(), ns);
            isvcs
                .patch_scale(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"replicas": d.replicas}})),
                )
                .await?;
        }
        if let Action::ScaleDown { pods, .. } = &d.action {
            // The ReplicaSet would pick a not-ready pod anyway (the drained one); deleting it
            // makes sure, and it is empty. Gone already is fine.
            let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), ns);
            for pod in pods {
                match api.delete(pod, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let (reason, verb) = match &d.action {
            Action::Hold => return Ok(()),
            Action::ScaleUp { .. } => ("ScaledUp", "ScaleUp"),
            Action::Drain { .. } => ("Draining", "Drain"),
            Action::CancelDrain { .. } => ("DrainCancelled", "CancelDrain"),
            Action::ScaleDown { .. } => ("ScaledDown", "ScaleDown"),
        };
        self.ctx
            .event(
                isvc,
                EventType::Normal,
                reason,
                verb,
                format!("{}: {}", d.summary(), d.reason),
            )
            .await;
        Ok(())
    }

    /// The loop's part of status after a pass, written when it differs from the object, and
    /// the service's gauges; a Warning Event when a pod starts waiting for a node or an HPA
    /// starts targeting the service too.
    async fn write_status(
        &self,
        isvc: &InferenceService,
        ns: &str,
        pods: &[Pod],
        pass: Pass<'_>,
    ) -> Result<(), Error> {
        self.record(isvc, pods, pass.pressure, pass.decision);
        let current = isvc.status.clone().unwrap_or_default();
        // One Warning Event per episode: the condition stays so while a pod waits for a node,
        // or while an HPA targets the service too.
        let [resources, scaling] = &pass.conditions;
        for (c, reason, action) in [
            (resources, "Unschedulable", "Schedule"),
            (scaling, scaling_active::CONFLICTING_AUTOSCALER, "Scale"),
        ] {
            if c.reason == reason && conditions::enters(&current.conditions, c) {
                self.ctx
                    .event(isvc, EventType::Warning, reason, action, c.message.clone())
                    .await;
            }
        }
        let after = LoopStatus::after(&current, isvc.metadata.generation, pass, Timestamp::now());
        if after.written_in(&current) {
            return Ok(());
        }
        merge_status(
            self.ctx.client.clone(),
            ns,
            &isvc.name_any(),
            &after.patch(),
        )
        .await
    }
}

/// Whether `status` holds a condition of the loop's that a service with no pods and autoscaling
/// off must still clear: a pod waiting for a node, or redline's autoscaling setting the
/// replicas (just switched off).
fn reports_stale_condition(isvc: &InferenceService) -> bool {
    isvc.status.as_ref().is_some_and(|s| {
        conditions::has(&s.conditions, RESOURCES_AVAILABLE, "False")
            || conditions::has(&s.conditions, SCALING_ACTIVE, "True")
    })
}

fn key(isvc: &InferenceService) -> String {
    format!(
        "{}/{}",
        isvc.namespace().unwrap_or_default(),
        isvc.name_any()
    )
}

fn action_label(a: &Action) -> &'static str {
    match a {
        Action::Hold => "hold",
        Action::ScaleUp { .. } => "scale_up",
        Action::Drain { .. } => "drain",
        Action::CancelDrain { .. } => "cancel_drain",
        Action::ScaleDown { .. } => "scale_down",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::report;
    use redline_api::Level;

    fn isvc(yaml: &str) -> InferenceService {
        let v: serde_json::Value = serde_yaml::from_str(yaml).unwrap();
        serde_json::from_value(v).unwrap()
    }

    const BASE: &str = "apiVersion: redline.dev/v1alpha1
kind: InferenceService
metadata: {name: s, namespace: n}
spec:
  model: {default: {}}
  minReplicas: 1
  maxReplicas: 4
  engine: {maxNumSeqsCeiling: 32, maxNumSeqs: 8, maxBatchedTokens: 512}
";

    #[test]
    fn the_policy_takes_the_services_bounds_and_limits_and_the_policys_numbers() {
        let i = isvc(BASE);
        let p = AutoscalingPolicySpec {
            target_utilization: Some(0.5),
            forecast_horizon_seconds: 90,
            ..Default::default()
        };
        let c = policy_config(&i, &p);
        assert_eq!((c.min_replicas, c.max_replicas), (1, 4));
        assert_eq!(c.pod_limits, Limits::new(8, 512));
        assert_eq!(c.target_utilization, 0.5);
        assert_eq!(c.forecast_horizon_seconds, 90.0);
        assert_eq!(c.backlog_drain_seconds, 90.0);
        assert_eq!(c.capacity.prompt_tokens_per_second, 230.0);
        // Without an initial value the ceiling is the target; min > max is never inverted.
        let i = isvc(
            &BASE
                .replace("maxNumSeqs: 8, ", "")
                .replace("maxReplicas: 4", "maxReplicas: 0"),
        );
        let c = policy_config(&i, &p);
        assert_eq!(c.pod_limits.max_num_seqs, 32);
        assert!(c.min_replicas <= c.max_replicas);
        // Unset, the target utilization follows how the engines admit: deadline-first when
        // the service has a TTFT objective, which the policy then sizes its error budget by.
        let unset = AutoscalingPolicySpec::default();
        let without = policy_config(&isvc(BASE), &unset);
        assert_eq!(without.target_utilization, 0.6);
        assert_eq!(without.ttft_objective_seconds, None);
        let with_slo = isvc(&format!("{BASE}  slo: {{ttftP99Ms: 2000}}\n"));
        let with = policy_config(&with_slo, &unset);
        assert_eq!(with.target_utilization, 1.0);
        assert_eq!(with.ttft_objective_seconds, Some(2.0));
        // The target KV usage follows whether the bench measured one sequence's step: with
        // it the pools are sized as queues (0.7), without proportionally (0.5); a written
        // target is kept either way.
        assert_eq!(without.target_kv_usage, 0.5);
        assert_eq!(without.capacity.step_seconds, None);
        let mut stepped = AutoscalingPolicySpec::default();
        stepped.replica_capacity.step_seconds = Some(0.0063);
        let c = policy_config(&isvc(BASE), &stepped);
        assert_eq!(
            (c.target_kv_usage, c.capacity.step_seconds),
            (0.7, Some(0.0063))
        );
        stepped.target_kv_usage = Some(0.6);
        assert_eq!(policy_config(&isvc(BASE), &stepped).target_kv_usage, 0.6);
    }

    fn context(client: kube::Client) -> Arc<Context> {
        Arc::new(Context::new(
            client,
            Default::default(),
            Default::default(),
            "test".into(),
        ))
    }

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[tokio::test]
    async fn services_stuck_on_an_api_server_that_never_answers_are_cut_off_together() {
        let client = crate::test_support::unavailable_api_server().await;
        let ctx = context(client);
        let mut a = Autoscaler::new(ctx.clone());
        // Eight autoscaled services, each of whose passes waits on the API server (kube's
        // client retries its 503s for minutes) until the limit cuts it off: one after the
        // other that is eight limits, at once about one.
        let isvcs: Vec<Arc<InferenceService>> = (0..8)
            .map(|n| {
                let yaml = BASE.replace("name: s,", &format!("name: s{n},"));
                Arc::new(isvc(&format!("{yaml}  autoscaling: {{enabled: true}}\n")))
            })
            .collect();
        let limit = Duration::from_secs(1);
        let t0 = Instant::now();
        a.pass(isvcs, HashMap::new(), limit).await;
        let took = t0.elapsed();
        assert!(took < 4 * limit, "{took:?}");
        assert_eq!(a.services.len(), 8);
        for (k, st) in &a.services {
            let err = st.last_error.current().unwrap_or_default();
            assert!(err.starts_with("no answer within"), "{k}: {err:?}");
        }
        let timeouts = ctx.metrics.errors.with_label_values(&["timeout"]).get();
        assert_eq!(timeouts, 8);
    }

    #[tokio::test]
    async fn services_read_a_shared_policy_from_the_watch_not_a_get_each_pass() {
        use std::sync::atomic::Ordering;
        let (client, gets) = crate::test_support::policies_api_server().await;
        let a = Autoscaler::new(context(client));
        let named = |r: &str| {
            isvc(&format!(
                "{BASE}  autoscaling: {{enabled: true, policyRef: {r}}}\n"
            ))
        };
        let window =
            |spec: Option<AutoscalingPolicySpec>| spec.map(|s| s.scale_down_window_seconds);
        // Before the watch's first list: a GET.
        assert_eq!(
            window(a.policy_spec(&named("shared"), "n").await.unwrap()),
            Some(42)
        );
        assert_eq!(gets.load(Ordering::SeqCst), 1);
        let t0 = Instant::now();
        while a.policies.current().is_none() {
            assert!(t0.elapsed() < Duration::from_secs(10), "the first list");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Then from the watch, however many passes: no more GETs; a policy it does not hold
        // is missing, as the GET would say.
        for _ in 0..20 {
            assert_eq!(
                window(a.policy_spec(&named("shared"), "n").await.unwrap()),
                Some(42)
            );
        }
        assert_eq!(
            window(a.policy_spec(&named("other"), "n").await.unwrap()),
            None
        );
        assert_eq!(
            window(a.policy_spec(&named("shared"), "elsewhere").await.unwrap()),
            None
        );
        assert_eq!(gets.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_services_gauges_follow_its_passes_and_go_with_it() {
        let ctx = context(crate::test_support::unavailable_api_server().await);
        let mut a = Autoscaler::new(ctx.clone());
        let i = isvc(&format!("{BASE}  slo: {{ttftP99Ms: 2000}}\n"));
        let ready = "status: {conditions: [{type: Ready, status: 'True'}]}";
        let pods = [
            pod(ready),
            pod(ready),
            pod("status: {conditions: [{type: Ready, status: 'False'}]}"),
            pod(&format!(
                "metadata: {{deletionTimestamp: '2026-11-29T00:00:00Z'}}\n{ready}"
            )),
        ];
        let reports = [
            Some(report(0.2, Level::Ok)),
            Some(report(0.6, Level::Ok)),
            None,
            None,
        ];
        let d = PolicyDecision {
            replicas: 3,
            action: Action::Hold,
            limits: Vec::new(),
            draining: Vec::new(),
            reason: String::new(),
            demand: redline_autoscale::Demand {
                replicas: 2.5,
                ..Default::default()
            },
            forecast: 2.75,
            unschedulable: 0,
            near_redline: false,
            error_budget_burn: Some(0.25),
        };
        let pressure = Pressure::of(&reports, true);
        a.record(&i, &pods, pressure, Some(&d));
        let m = redline_api::prom::Exposition::parse(&ctx.metrics.render()).unwrap();
        let of = |name: &str| {
            m.sum_where(
                &format!("redline_operator_service_{name}"),
                &[("namespace", "n"), ("inferenceservice", "s")],
            )
        };
        assert_eq!(of("desired_replicas"), Some(3.0));
        assert_eq!(of("ready_replicas"), Some(2.0));
        assert_eq!(of("demand_replicas"), Some(2.5));
        assert_eq!(of("forecast_replicas"), Some(2.75));
        assert_eq!(of("kv_usage_ratio"), Some(0.4));
        assert_eq!(of("kv_usage_max_ratio"), Some(0.6));
        assert_eq!(of("error_budget_burn_rate"), Some(0.25));
        // Without a decision (autoscaling off) the policy's series go, the spec's replicas stay.
        a.record(&i, &pods, pressure, None);
        let m = redline_api::prom::Exposition::parse(&ctx.metrics.render()).unwrap();
        assert_eq!(
            m.sum_where("redline_operator_service_desired_replicas", &[]),
            Some(1.0)
        );
        assert_eq!(m.sum("redline_operator_service_forecast_replicas"), None);
        // A service no longer passed (deleted) loses its series at the next pass.
        a.recorded.insert(key(&i));
        a.pass(Vec::new(), HashMap::new(), Duration::from_secs(1))
            .await;
        let text = ctx.metrics.render();
        assert!(!text.contains("redline_operator_service_"), "{text}");
    }

    /// A leader that stops writes each policy's memory with its demand history, once per
    /// service with a policy; one that lost the Lease writes nothing (a new leader may be
    /// writing already).
    #[tokio::test]
    async fn a_stopping_leader_hands_its_policies_over_and_one_that_lost_the_lease_writes_nothing()
    {
        let object = serde_json::to_value(isvc(BASE)).unwrap();
        for (stop, writes) in [(Stop::LeadershipLost, 0), (Stop::HandOver, 1)] {
            let (client, patches) = crate::test_support::status_patches(object.clone()).await;
            let mut a = Autoscaler::new(context(client));
            let i = isvc(&format!("{BASE}  autoscaling: {{enabled: true}}\n"));
            let cfg = policy_config(&i, &Default::default());
            let mut policy = Policy::new(cfg);
            for t in 0..12 {
                policy.decide(&Observation {
                    now: t as f64 * 5.0,
                    desired: 1,
                    pods: Vec::new(),
                });
            }
            a.services.insert(
                "n/s".into(),
                ServiceState {
                    policy: Some(policy),
                    ..Default::default()
                },
            );
            // Paused (no policy): nothing to hand over.
            a.services
                .insert("n/paused".into(), ServiceState::default());
            let (store, _writer) = kube::runtime::reflector::store::<InferenceService>();
            a.run(store, Duration::from_secs(3600), std::future::ready(stop))
                .await;
            let patches = patches.lock().unwrap().clone();
            assert_eq!(patches.len(), writes, "{stop:?}: {patches:?}");
            if let Some((path, body)) = patches.first() {
                assert_eq!(
                    path,
                    "/apis/redline.dev/v1alpha1/namespaces/n/inferenceservices/s/status"
                );
                let history = &body["status"]["autoscalerMemory"]["demandHistory"];
                assert_eq!(
                    history["samples"].as_array().map(Vec::len),
                    Some(12),
                    "{body}"
                );
            }
        }
    }

    #[tokio::test]
    async fn while_the_pod_watch_fails_the_loop_lists_the_pods_afresh() {
        let ctx = context(crate::test_support::list_then_fail().await);
        let mut a = Autoscaler::new(ctx);
        // Before the watch's first list, and once its watch has failed: the list's pods.
        for _ in 0..100 {
            if a.pods.last_seen().is_some() && a.pods.current().is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(a.pods.current().is_none(), "the watch never failed");
        let pods = a.engine_pods().await.expect("listed");
        assert_eq!(pods["n/"].len(), 1, "{pods:?}");
        assert_eq!(pods["n/"][0].metadata.name.as_deref(), Some("p"));
    }
}
