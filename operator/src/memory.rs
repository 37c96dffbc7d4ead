//! The autoscaling policy's memory in the InferenceService's status
//! (`status.autoscalerMemory`), so that a new leader goes on where the last one stopped: its
//! error budget (a failover in the middle of a burst must not size lean because it has seen
//! nothing late yet), its windows and reversals, its drains (adopted, not cancelled).
//!
//! Written with the rest of the loop's status, but not at every pass: the budget's newest span
//! changes every pass, so it is written when a late request is counted, or once a minute, and
//! so is the last pass that saw a pod starting ([`due`]); anything else (a scaling action, a
//! drain, a window doubled) is written at once. A failover loses at most a minute of first
//! tokens counted, never a decision.
//!
//! A leader that stops (SIGTERM: a rolling update, a drained node) writes it once more as it
//! stops, with the policy's demand history (`demandHistory`, [`to_status`] of
//! `Policy::handover`): its successor then decides as it would have, where one after a lost
//! leader starts its forecast and windows from its own few samples. The successor's first
//! write removes the history (it is not kept up to date).

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use redline_autoscale::budget::{BudgetMemory, BudgetSpan as Span};
use redline_autoscale::{PolicyMemory, SampleMemory};

use crate::crd::{
    AutoscalerMemory, BudgetSpan, DemandHistory, DemandSample, DrainingPod, InferenceService,
};

/// The unit of a load in `demandHistory`: a millionth of a replica.
const MICRO: f64 = 1e6;

/// The most demand samples handed over (the newest): about 150 KiB of status, well under the
/// API server's limit on an object. The default 300 s window keeps 240 samples at a 5 s
/// interval; a window of an hour at 0.5 s would keep 28,800. A successor handed fewer than
/// its window holds drains nothing until it has seen the rest itself.
const MAX_HISTORY_SAMPLES: usize = 1000;

/// How stale what moves every pass may be in status (see [`due`]).
const REFRESH_SECONDS: i64 = 60;

/// A clock for the policy: its seconds since `epoch` (an instant of the loop's start), and
/// the wall time they are.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub epoch: Timestamp,
}

impl Clock {
    /// The wall time `t` seconds after the epoch, to the second: the same instant renders the
    /// same at every pass.
    fn wall(&self, t: f64) -> String {
        let at = self.epoch + SignedDuration::from_secs_f64(t);
        Timestamp::from_second(at.as_second())
            .unwrap_or(at)
            .to_string()
    }

    /// Seconds from the wall time `text` to `now` on the policy's clock; `None` when it does
    /// not parse (an edited status: that part is forgotten).
    fn age(&self, text: &str, now: f64) -> Option<f64> {
        let at: Timestamp = text.parse().ok()?;
        let now = self.epoch + SignedDuration::from_secs_f64(now);
        Some(now.duration_since(at).as_secs_f64())
    }
}

/// The policy's memory at `now` as status holds it.
pub fn to_status(m: &PolicyMemory, clock: Clock, now: f64) -> AutoscalerMemory {
    let wall = |age: Option<f64>| age.map(|a| clock.wall(now - a));
    AutoscalerMemory {
        last_scale_up_time: wall(m.last_up_age),
        last_scale_down_time: wall(m.last_down_age),
        last_reversing_scale_down_time: wall(m.last_down_reversal_age),
        last_pod_starting_time: wall(m.last_starting_age),
        scale_down_window_seconds: m.scale_down_window_seconds.round() as i64,
        draining: m
            .draining
            .iter()
            .map(|(pod, age)| DrainingPod {
                pod: pod.clone(),
                since: clock.wall(now - age),
            })
            .collect(),
        error_budget: m
            .budget
            .spans
            .iter()
            .map(|s| BudgetSpan {
                until: clock.wall(now - s.age),
                late: s.late.round() as i64,
                first_tokens: s.first.round() as i64,
            })
            .collect(),
        last_late_time: wall(m.budget.last_late_age),
        catch_up_time: wall(m.budget.catch_up_age),
        demand_history: history_to_status(&m.history, clock, now),
    }
}

/// The samples' ages count back from `takenAt`, `now` to the second.
fn history_to_status(history: &[SampleMemory], clock: Clock, now: f64) -> Option<DemandHistory> {
    if history.is_empty() {
        return None;
    }
    let taken_at = clock.wall(now);
    let past = clock.age(&taken_at, now).unwrap_or(0.0);
    let micro = |x: f64| (x * MICRO).round() as i64;
    let newest = &history[history.len().saturating_sub(MAX_HISTORY_SAMPLES)..];
    let samples = newest
        .iter()
        .map(|s| DemandSample {
            age_ms: ((s.age - past) * 1000.0).round() as i64,
            demand: s.demand.iter().map(|&x| micro(x)).collect(),
            kv: s.kv.iter().map(|&x| micro(x)).collect(),
            reserve: micro(s.reserve),
            desired: s.desired.into(),
            guarded: micro(s.guarded),
            lean: micro(s.lean),
            complete: s.complete,
        })
        .collect();
    Some(DemandHistory { taken_at, samples })
}

/// The samples of `h` as of `now`; none when `takenAt` does not parse or a sample has not
/// three of each average (an edited status: the successor starts as after a lost leader).
fn history_from_status(h: &DemandHistory, clock: Clock, now: f64) -> Vec<SampleMemory> {
    let Some(taken) = clock.age(&h.taken_at, now) else {
        return Vec::new();
    };
    let three = |v: &[i64]| -> Option<[f64; 3]> {
        let [a, b, c] = v else { return None };
        Some([*a as f64 / MICRO, *b as f64 / MICRO, *c as f64 / MICRO])
    };
    h.samples
        .iter()
        .map(|s| {
            Some(SampleMemory {
                age: taken + s.age_ms as f64 / 1000.0,
                demand: three(&s.demand)?,
                kv: three(&s.kv)?,
                reserve: s.reserve as f64 / MICRO,
                desired: u32::try_from(s.desired).ok()?,
                guarded: s.guarded as f64 / MICRO,
                lean: s.lean as f64 / MICRO,
                complete: s.complete,
            })
        })
        .collect::<Option<Vec<_>>>()
        .unwrap_or_default()
}

/// The memory status holds, as a policy at `now` restores it.
pub fn from_status(s: &AutoscalerMemory, clock: Clock, now: f64) -> PolicyMemory {
    let age = |t: &Option<String>| t.as_deref().and_then(|t| clock.age(t, now));
    let history = s
        .demand_history
        .as_ref()
        .map(|h| history_from_status(h, clock, now))
        .unwrap_or_default();
    PolicyMemory {
        last_up_age: age(&s.last_scale_up_time),
        last_down_age: age(&s.last_scale_down_time),
        last_down_reversal_age: age(&s.last_reversing_scale_down_time),
        last_starting_age: age(&s.last_pod_starting_time),
        scale_down_window_seconds: s.scale_down_window_seconds as f64,
        draining: s
            .draining
            .iter()
            .filter_map(|d| Some((d.pod.clone(), clock.age(&d.since, now)?)))
            .collect(),
        budget: BudgetMemory {
            spans: s
                .error_budget
                .iter()
                .filter_map(|b| {
                    Some(Span {
                        age: clock.age(&b.until, now)?,
                        late: b.late as f64,
                        first: b.first_tokens as f64,
                    })
                })
                .collect(),
            last_late_age: age(&s.last_late_time),
            catch_up_age: age(&s.catch_up_time),
            // A stopped leader's budget last counted at its last decision, its newest sample;
            // a memory written as it went may be a minute older than that.
            last_seen_age: history.last().map(|h| h.age),
        },
        history,
    }
}

/// Whether `new` is to be written over `written` (see the module): anything changed but the
/// times that move at every pass, the budget's newest span (written when a late request is
/// counted in it, or once it is a minute stale) and the last pass that saw a pod starting
/// (a minute stale at most: a successor sees starting pods itself, and drains only after a
/// whole window of its own data).
pub fn due(written: Option<&AutoscalerMemory>, new: &AutoscalerMemory) -> bool {
    let Some(old) = written else {
        return true;
    };
    let split = |m: &AutoscalerMemory| {
        let mut m = m.clone();
        let newest = m.error_budget.pop();
        let starting = m.last_pod_starting_time.take();
        (m, newest, starting)
    };
    let ((old, old_span, old_starting), (new, new_span, new_starting)) = (split(old), split(new));
    // Whether `n` is a minute or more after `o` (or either does not parse).
    let stale = |o: &str, n: &str| -> bool {
        match (o.parse::<Timestamp>(), n.parse::<Timestamp>()) {
            (Ok(o), Ok(n)) => n.duration_since(o).as_secs() >= REFRESH_SECONDS,
            _ => true,
        }
    };
    let span_due = match (old_span, new_span) {
        (Some(o), Some(n)) => o.late != n.late || stale(&o.until, &n.until),
        (o, n) => o != n,
    };
    let starting_due = match (old_starting, new_starting) {
        (Some(o), Some(n)) => stale(&o, &n),
        (o, n) => o != n,
    };
    old != new || span_due || starting_due
}

/// The memory status keeps for `isvc` while no policy runs for it: none with autoscaling off
/// (turning it off forgets it); otherwise, a pause (an HPA scales the service too, the spec is
/// invalid, its AutoscalingPolicy is missing), the one written, less its drains.
pub fn without_policy(isvc: &InferenceService) -> Option<AutoscalerMemory> {
    let enabled = isvc.spec.autoscaling.as_ref().is_some_and(|a| a.enabled);
    let written = isvc.status.as_ref()?.autoscaler_memory.as_ref();
    if enabled {
        paused(written)
    } else {
        None
    }
}

/// The memory kept while autoscaling is paused: all of it but the drains, which the loop
/// cancels as it pauses (a pod drained for good would serve nothing until the pause ends), and
/// a demand history a stopped leader handed over (it describes the load as that leader
/// stopped, not as the pause ends, and is tens of KiB). Autoscaling goes on from it when the
/// pause ends, as a new leader would after a lost one.
pub fn paused(written: Option<&AutoscalerMemory>) -> Option<AutoscalerMemory> {
    written.map(|m| AutoscalerMemory {
        draining: Vec::new(),
        demand_history: None,
        ..m.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use redline_api::{Level, Limits};
    use redline_autoscale::{
        Action, Observation, PodPhase, PodSignals, PodView, Policy, PolicyConfig, ReplicaCapacity,
    };

    fn clock() -> Clock {
        Clock {
            epoch: "2026-11-29T10:00:00.25Z".parse().expect("a time"),
        }
    }

    #[test]
    fn the_memory_reads_back_as_written_to_the_second() {
        let m = PolicyMemory {
            last_up_age: Some(30.0),
            last_down_age: None,
            last_down_reversal_age: Some(4000.0),
            last_starting_age: Some(12.4),
            scale_down_window_seconds: 600.0,
            draining: vec![("pod-a".into(), 8.0)],
            budget: BudgetMemory {
                spans: vec![
                    Span {
                        age: 310.0,
                        late: 3.4,
                        first: 1200.0,
                    },
                    Span {
                        age: 2.0,
                        late: 0.0,
                        first: 40.0,
                    },
                ],
                last_late_age: Some(320.0),
                catch_up_age: None,
                last_seen_age: None,
            },
            history: Vec::new(),
        };
        // A policy clock at 5000 s: the wall time 11:23:20.25.
        let s = to_status(&m, clock(), 5000.0);
        assert_eq!(
            s.last_scale_up_time.as_deref(),
            Some("2026-11-29T11:22:50Z")
        );
        assert_eq!(s.last_scale_down_time, None);
        assert_eq!(s.draining[0].since, "2026-11-29T11:23:12Z");
        assert_eq!(
            (s.error_budget[0].late, s.error_budget[0].first_tokens),
            (3, 1200)
        );
        // Read back by a successor whose clock started 1000 s later, 10 s on.
        let later = Clock {
            epoch: clock().epoch + SignedDuration::from_secs(1000),
        };
        let r = from_status(&s, later, 4010.0);
        let close = |a: Option<f64>, b: f64| (a.expect("kept") - b).abs() <= 1.0;
        assert!(close(r.last_up_age, 40.0), "{:?}", r.last_up_age);
        assert!(
            close(r.last_starting_age, 22.4),
            "{:?}",
            r.last_starting_age
        );
        assert!(close(r.budget.last_late_age, 330.0));
        assert!(close(Some(r.draining[0].1), 18.0));
        assert_eq!(r.last_down_age, None);
        assert_eq!(r.budget.catch_up_age, None);
        assert_eq!(r.scale_down_window_seconds, 600.0);
        assert_eq!(r.budget.spans[0].late, 3.0);
        // An edited status: what does not parse is forgotten, the rest kept.
        let mut bad = s.clone();
        bad.last_scale_up_time = Some("yesterday".into());
        let r = from_status(&bad, later, 4010.0);
        assert_eq!(r.last_up_age, None);
        assert!(close(r.last_starting_age, 22.4));
    }

    #[test]
    fn a_handed_over_history_reads_back_and_an_edited_one_is_dropped_whole() {
        let sample = |age: f64, demand: f64| SampleMemory {
            age,
            demand: [demand, demand * 0.9, demand * 0.8],
            kv: [0.25, 0.2, 0.125],
            reserve: 1.5,
            desired: 3,
            guarded: demand * 1.2,
            lean: demand,
            complete: true,
        };
        let m = PolicyMemory {
            scale_down_window_seconds: 300.0,
            history: vec![sample(300.0, 2.0), sample(5.0, 2.5), sample(0.0, 2.75)],
            ..Default::default()
        };
        // Taken at 5000.4 s (11:23:20.65), read 12 s later by a successor 1000 s behind.
        let s = to_status(&m, clock(), 5000.4);
        let h = s.demand_history.clone().expect("the history");
        assert_eq!(h.taken_at, "2026-11-29T11:23:20Z");
        assert_eq!(h.samples[2].age_ms, -650);
        assert_eq!(h.samples[0].demand, vec![2_000_000, 1_800_000, 1_600_000]);
        let later = Clock {
            epoch: clock().epoch + SignedDuration::from_secs(1000),
        };
        let r = from_status(&s, later, 4012.4);
        assert_eq!(r.history.len(), 3);
        for (got, want) in r.history.iter().zip(&m.history) {
            assert!((got.age - (want.age + 12.0)).abs() < 1e-6, "{got:?}");
            assert_eq!(
                SampleMemory { age: 0.0, ..*got },
                SampleMemory { age: 0.0, ..*want }
            );
        }
        // The budget counts from the old leader's last decision, its newest sample.
        assert!((r.budget.last_seen_age.expect("kept") - 12.0).abs() < 1e-6);
        // Without the history (a lost leader's memory), it counts from its own first pass.
        let plain = AutoscalerMemory {
            demand_history: None,
            ..s.clone()
        };
        assert_eq!(
            from_status(&plain, later, 4012.4).budget.last_seen_age,
            None
        );
        // A long history: the newest samples, within the API server's limit on an object.
        let long = PolicyMemory {
            history: (0..3000).rev().map(|i| sample(i as f64, 1.0)).collect(),
            ..Default::default()
        };
        let h = to_status(&long, clock(), 5000.0)
            .demand_history
            .expect("history");
        assert_eq!(h.samples.len(), MAX_HISTORY_SAMPLES);
        assert!(h.samples[0].age_ms < 1_000_000, "{:?}", h.samples[0]);
        // A sample edited to two averages, or a time that does not parse: no history at all
        // (a successor starts as after a lost leader), the rest of the memory kept.
        let mut bad = s.clone();
        bad.demand_history.as_mut().expect("history").samples[1]
            .kv
            .pop();
        let r = from_status(&bad, later, 4012.4);
        assert!(r.history.is_empty());
        assert_eq!(r.scale_down_window_seconds, 300.0);
        let mut bad = s;
        bad.demand_history.as_mut().expect("history").taken_at = "soon".into();
        assert!(from_status(&bad, later, 4012.4).history.is_empty());
    }

    #[test]
    fn what_moves_every_pass_is_written_once_a_minute_and_the_rest_as_it_changes() {
        let at = |t: f64, late: i64, first: i64| AutoscalerMemory {
            scale_down_window_seconds: 300,
            error_budget: vec![
                BudgetSpan {
                    until: clock().wall(0.0),
                    late: 1,
                    first_tokens: 900,
                },
                BudgetSpan {
                    until: clock().wall(t),
                    late,
                    first_tokens: first,
                },
            ],
            ..AutoscalerMemory::default()
        };
        let written = at(400.0, 0, 100);
        assert!(due(None, &written));
        assert!(!due(Some(&written), &written));
        assert!(
            !due(Some(&written), &at(455.0, 0, 160)),
            "first tokens, 55 s on"
        );
        assert!(due(Some(&written), &at(460.0, 0, 170)), "a minute on");
        assert!(due(Some(&written), &at(405.0, 1, 105)), "a late request");
        let mut up = written.clone();
        up.last_scale_up_time = Some(clock().wall(401.0));
        assert!(due(Some(&written), &up), "a decision");
        // Pods starting: the first pass that sees them is written, the next minute's not.
        let starting = |t: f64| AutoscalerMemory {
            last_pod_starting_time: Some(clock().wall(t)),
            ..written.clone()
        };
        assert!(due(Some(&written), &starting(401.0)), "pods starting");
        assert!(!due(Some(&starting(401.0)), &starting(455.0)));
        assert!(due(Some(&starting(401.0)), &starting(461.0)));
        let mut closed = written.clone();
        closed.error_budget.push(BudgetSpan {
            until: clock().wall(601.0),
            late: 0,
            first_tokens: 5,
        });
        assert!(due(Some(&written), &closed), "a new span");
    }

    /// Through status and back, a policy's memory restores a policy that decides as the one
    /// restored from the memory itself (the round trip loses only fractions of a second and
    /// of a request).
    #[test]
    fn a_policy_restored_through_status_decides_as_one_restored_directly_and_a_handed_one_as_the_old(
    ) {
        let cfg = PolicyConfig {
            min_replicas: 1,
            max_replicas: 8,
            capacity: ReplicaCapacity {
                prompt_tokens_per_second: 100.0,
                generation_tokens_per_second: 100.0,
                step_seconds: None,
            },
            target_utilization: 1.0,
            target_kv_usage: 0.5,
            forecast_horizon_seconds: 60.0,
            trend_window_seconds: 75.0,
            trend_smoothing_seconds: 15.0,
            demand_smoothing_seconds: 10.0,
            scale_up_cooldown_seconds: 15.0,
            scale_down_window_seconds: 120.0,
            max_step: 1,
            stale_after_seconds: 10.0,
            backlog_drain_seconds: 60.0,
            drain_timeout_seconds: 60.0,
            pod_limits: Limits::new(8, 512),
            ttft_objective_seconds: Some(2.0),
        };
        // `tps` prompt tokens a second over `n` pods, `late` of each one's 5 first tokens late.
        let view = |n: u32, tps: f64, late: f64| {
            (0..n)
                .map(|i| PodView {
                    name: format!("p{i}"),
                    phase: PodPhase::Ready,
                    signals: Some(PodSignals {
                        sample_age_seconds: 0.5,
                        kv_usage: 0.0,
                        running: 1,
                        waiting: 0,
                        lame_duck: false,
                        waiting_tokens: Some(0),
                        prompt_tokens_per_second: Some(tps / n as f64),
                        generation_tokens_per_second: Some(0.0),
                        preemptions_per_second: 0.0,
                        level: Level::Ok,
                        arrival_peaks: Vec::new(),
                        late_per_second: Some(late),
                        first_tokens_per_second: Some(5.0),
                        busy_share: None,
                        steps_per_second: None,
                    }),
                })
                .collect::<Vec<_>>()
        };
        // Three replicas through a burst that made requests late, then a light load that
        // drains two of them.
        let mut p = Policy::new(cfg);
        let mut desired = 3;
        for i in 0..200 {
            let t = i as f64 * 5.0;
            let (tps, late) = if (40..60).contains(&i) {
                (250.0, 0.5)
            } else {
                (50.0, 0.0)
            };
            desired = p
                .decide(&Observation {
                    now: t,
                    desired,
                    pods: view(desired, tps, late),
                })
                .replicas;
        }
        assert_eq!(desired, 1);
        let now = 1000.0;
        let m = p.memory(now);
        assert!(
            m.last_down_age.is_some() && m.budget.last_late_age.is_some(),
            "{m:?}"
        );
        let through = from_status(&to_status(&m, clock(), now), clock(), now);
        let mut restored = [
            Policy::restore(cfg, &m, now),
            Policy::restore(cfg, &through, now),
        ];
        let mut fresh = Policy::new(cfg);
        // Handed over as a stopping leader writes it, and read by a successor whose clock
        // started 1000 s later: it decides as the old policy, going on, would have.
        let later = Clock {
            epoch: clock().epoch + SignedDuration::from_secs(1000),
        };
        let status = to_status(&p.handover(now), clock(), now);
        let history = status.demand_history.as_ref().expect("the demand history");
        assert_eq!(history.samples.len(), p.handover(now).history.len());
        assert!(serde_json::to_string(&status).expect("json").len() < 40_000);
        let mut handed = Policy::restore(
            cfg,
            &from_status(&status, later, now - 1000.0),
            now - 1000.0,
        );
        // 90 tokens a second: 0.9 replicas at full capacity. Lean sizing holds one replica;
        // sizing guarded (the budget the burst overspent), it starts a second.
        let mut ups = 0;
        for i in 1..40 {
            let o = Observation {
                now: now + i as f64 * 5.0,
                desired,
                pods: view(desired, 90.0, 0.0),
            };
            let [a, b] = restored.each_mut().map(|p| p.decide(&o));
            assert_eq!(
                a.action, b.action,
                "at {}: {} / {}",
                o.now, a.reason, b.reason
            );
            let burn = |d: &redline_autoscale::Decision| d.error_budget_burn.expect("objective");
            assert!(
                (burn(&a) - burn(&b)).abs() < 0.01,
                "{} vs {}",
                burn(&a),
                burn(&b)
            );
            assert!(burn(&a) > 1.0);
            if matches!(a.action, Action::ScaleUp { .. }) {
                ups += 1;
            }
            let h = handed.decide(&Observation {
                now: o.now - 1000.0,
                ..o.clone()
            });
            let old = p.decide(&o);
            assert_eq!(
                h.action, old.action,
                "at {}: {} / {}",
                o.now, h.reason, old.reason
            );
            assert!((h.forecast - old.forecast).abs() < 1e-3, "{h:?} vs {old:?}");
            let f = fresh.decide(&Observation { desired: 1, ..o });
            assert_eq!(f.action, Action::Hold, "{}", f.reason);
            desired = a.replicas;
        }
        assert_eq!((ups, desired), (1, 2));
    }

    #[test]
    fn a_paused_service_keeps_its_memory_but_its_drains() {
        assert_eq!(paused(None), None);
        let m = AutoscalerMemory {
            last_scale_down_time: Some("2026-11-29T10:00:00Z".into()),
            scale_down_window_seconds: 600,
            draining: vec![DrainingPod {
                pod: "pod-a".into(),
                since: "2026-11-29T10:01:00Z".into(),
            }],
            // Handed over by a leader that stopped just before the pause began.
            demand_history: Some(DemandHistory {
                taken_at: "2026-11-29T10:01:30Z".into(),
                samples: vec![DemandSample {
                    demand: vec![1_000_000; 3],
                    kv: vec![0; 3],
                    desired: 2,
                    complete: true,
                    ..Default::default()
                }],
            }),
            ..Default::default()
        };
        let kept = paused(Some(&m)).unwrap();
        assert!(kept.draining.is_empty());
        assert_eq!(kept.demand_history, None);
        assert_eq!(
            (kept.last_scale_down_time, kept.scale_down_window_seconds),
            (m.last_scale_down_time.clone(), 600)
        );
        // Restored when the pause ends, it drains nothing.
        let restored = from_status(&paused(Some(&m)).unwrap(), clock(), 3600.0);
        assert!(restored.draining.is_empty() && restored.history.is_empty());
        assert_eq!(restored.budget.last_seen_age, None);
        assert_eq!(restored.scale_down_window_seconds, 600.0);
    }
}
