use super::*;
use proptest::prelude::*;
use redline_api::ArrivalPeak;

fn cfg() -> PolicyConfig {
    PolicyConfig {
        min_replicas: 1,
        max_replicas: 8,
        capacity: ReplicaCapacity {
            prompt_tokens_per_second: 1000.0,
            generation_tokens_per_second: 100.0,
            step_seconds: None,
        },
        target_utilization: 0.5,
        target_kv_usage: 0.7,
        forecast_horizon_seconds: 60.0,
        trend_window_seconds: 20.0,
        trend_smoothing_seconds: 0.0,
        demand_smoothing_seconds: 10.0,
        scale_up_cooldown_seconds: 15.0,
        scale_down_window_seconds: 120.0,
        max_step: 2,
        stale_after_seconds: 10.0,
        backlog_drain_seconds: 10.0,
        drain_timeout_seconds: 60.0,
        pod_limits: Limits::new(32, 512),
        ttft_objective_seconds: None,
    }
}

fn signals(prompt_tps: f64, running: u64) -> PodSignals {
    PodSignals {
        sample_age_seconds: 0.5,
        kv_usage: 0.1,
        running,
        waiting: 0,
        lame_duck: false,
        waiting_tokens: Some(0),
        prompt_tokens_per_second: Some(prompt_tps),
        generation_tokens_per_second: Some(0.0),
        preemptions_per_second: 0.0,
        level: Level::Ok,
        arrival_peaks: Vec::new(),
        late_per_second: None,
        first_tokens_per_second: None,
        busy_share: None,
        steps_per_second: None,
    }
}

/// `n` ready pods sharing `total_tps` prompt tokens per second.
fn obs(now: f64, desired: u32, n: u32, total_tps: f64) -> Observation {
    Observation {
        now,
        desired,
        pods: (0..n)
            .map(|i| PodView {
                name: format!("p{i}"),
                phase: PodPhase::Ready,
                signals: Some(signals(total_tps / n as f64, 1)),
            })
            .collect(),
    }
}

#[test]
fn scales_up_to_the_demand_in_steps_and_counts_starting_pods() {
    let mut p = Policy::new(cfg());
    // 2000 tokens/s at 1000 per replica and 50% target: 4 replicas.
    let d = p.decide(&obs(0.0, 1, 1, 2000.0));
    assert_eq!(d.action, Action::ScaleUp { from: 1, to: 3 }, "{}", d.reason);
    // Two pods starting, demand unchanged: one more step after the cooldown, not before.
    let mut o = obs(5.0, 3, 1, 2000.0);
    for i in 0..2 {
        o.pods.push(PodView {
            name: format!("new{i}"),
            phase: PodPhase::Starting,
            signals: None,
        });
    }
    assert_eq!(p.decide(&o).action, Action::Hold);
    o.now = 15.0;
    let d = p.decide(&o);
    assert_eq!(d.action, Action::ScaleUp { from: 3, to: 4 }, "{}", d.reason);
    o.desired = 4;
    o.now = 40.0;
    assert_eq!(p.decide(&o).action, Action::Hold, "4 carry the demand");
}

/// A service with a 2 s TTFT objective, planned at full capacity (the default with one), its
/// pods counting `late` of 20 first tokens per second and seeing bursts of `burst` tokens
/// within a second.
fn with_slo(now: f64, desired: u32, total_tps: f64, late: f64, burst: u64) -> Observation {
    let mut o = obs(now, desired, desired, total_tps);
    let n = desired as f64;
    for v in &mut o.pods {
        let s = v.signals.as_mut().expect("ready pods report");
        s.late_per_second = Some(late / n);
        s.first_tokens_per_second = Some(20.0 / n);
        s.arrival_peaks = vec![ArrivalPeak {
            window_seconds: 1.0,
            tokens: burst / desired as u64,
        }];
    }
    o
}

/// `o` with every pod's KV cache at `kv`.
fn with_kv(mut o: Observation, kv: f64) -> Observation {
    for v in &mut o.pods {
        v.signals.as_mut().expect("ready pods report").kv_usage = kv;
    }
    o
}

/// A fresh policy's decisions every 5 s for `ticks` ticks: `desired` replicas serving `tps`
/// tokens/s, nothing late, every pod's KV usage `kv(t)`.
fn kv_ticks(
    desired: u32,
    tps: f64,
    kv: fn(f64) -> f64,
    ticks: usize,
) -> impl Iterator<Item = (f64, Decision)> {
    let mut p = Policy::new(slo_cfg());
    (0..=ticks).map(move |i| {
        let t = i as f64 * 5.0;
        (
            t,
            p.decide(&with_kv(with_slo(t, desired, tps, 0.0, 0), kv(t))),
        )
    })
}

fn slo_cfg() -> PolicyConfig {
    PolicyConfig {
        target_utilization: 1.0,
        ttft_objective_seconds: Some(2.0),
        ..cfg()
    }
}

#[test]
fn the_error_budget_decides_the_margin() {
    // A ramp from 1000 to 1900 tokens/s on two replicas of 1000: it fits them at full capacity.
    let ramp = |t: f64| 1000.0 + 15.0 * t.min(60.0);
    let run = |late: f64| {
        let mut p = Policy::new(slo_cfg());
        let mut last = None;
        for i in 0..=12 {
            let t = i as f64 * 5.0;
            last = Some(p.decide(&with_slo(t, 2, ramp(t), late, 0)));
        }
        last.expect("decided")
    };
    // Nothing late: planned lean, no trend, no margin: two replicas carry it.
    let lean = run(0.0);
    assert_eq!(lean.action, Action::Hold, "{}", lean.reason);
    assert!(lean.forecast < 2.0, "{}", lean.forecast);
    // Late requests burning the budget: the trend and the margin for the cold start.
    let guarded = run(1.0);
    assert!(
        matches!(guarded.action, Action::ScaleUp { from: 2, .. }),
        "{}",
        guarded.reason
    );
    // The trend (up to half the demand again) times 1.2 (cold start 60 s).
    assert!(
        guarded.forecast > 1.2 * 1.3 * lean.forecast,
        "{}",
        guarded.forecast
    );
    // Without an objective nothing is counted: the load-only forecast, with its trend.
    let mut p = Policy::new(PolicyConfig {
        ttft_objective_seconds: None,
        ..slo_cfg()
    });
    let mut reactive = None;
    for i in 0..=12 {
        let t = i as f64 * 5.0;
        reactive = Some(p.decide(&with_slo(t, 2, ramp(t), 1.0, 0)).forecast);
    }
    let reactive = reactive.expect("decided");
    assert!(
        reactive > lean.forecast && reactive < guarded.forecast,
        "{reactive}"
    );
}

/// Nothing late and the compute load flat, while the pods' KV pools fill from 10% to 60% in a
/// minute (answers outlasting the arrivals between them). The KV term stays under the two
/// replicas throughout (1.71 at 60%), but the fill carries on: lean sizing starts a third one
/// while it rises, a cold start before the pools are full. The same pools holding at 60%
/// start nothing.
#[test]
fn lean_sizing_starts_a_replica_while_the_kv_pools_fill() {
    let first_up = |kv: fn(f64) -> f64| {
        kv_ticks(2, 200.0, kv, 12).find_map(|(t, d)| {
            assert!(d.demand.kv_replicas < 2.0, "{}", d.demand.kv_replicas);
            matches!(d.action, Action::ScaleUp { from: 2, to: 3 }).then(|| {
                assert!(d.reason.contains("lean"), "{}", d.reason);
                assert!(d.reason.contains("kv rise +"), "{}", d.reason);
                t
            })
        })
    };
    let up = first_up(|t| 0.1 + 0.5 * t / 60.0).expect("a scale-up while the pools fill");
    assert!(up < 60.0, "at {up} s");
    assert_eq!(first_up(|_| 0.6), None);
}

#[test]
fn a_drain_waits_while_the_kv_pools_rise_would_call_the_replica_back() {
    // Three pods whose pools fill for a minute and empty again (conversations that end): the
    // KV term peaks at 3 x 0.32 / 0.7 = 1.37, under the 1.7 two pods carry with the margin,
    // but while the pools fill, lean sizing adds their rise over the horizon (about +0.5) and
    // wants the third pod. Drained at such a peak, it would be started again.
    let drains = |kv: fn(f64) -> f64| {
        kv_ticks(3, 300.0, kv, 100).any(|(t, d)| {
            assert!(
                !matches!(d.action, Action::ScaleUp { .. }),
                "at {t} s: {}",
                d.reason
            );
            matches!(d.action, Action::Drain { .. })
        })
    };
    assert!(!drains(|t| 0.2 + 0.12 * (t % 60.0) / 60.0));
    // The same peak, held flat: nothing rises, two pods carry it.
    assert!(drains(|_| 0.32));
}

/// Whether three replicas serving `tps` tokens/s (1000 each at full capacity), nothing late,
/// drain one within 200 s.
fn lean_drains_at(tps: f64) -> bool {
    kv_ticks(3, tps, |_| 0.1, 40).any(|(_, d)| matches!(d.action, Action::Drain { .. }))
}

#[test]
fn while_nothing_burns_a_drain_leaves_the_survivors_at_90_percent() {
    // Two replicas carry 1750 tokens/s at 87.5% of full capacity: a drain while lean (at the
    // guarded margin, 85%, it waited), but not 1850 (92.5%).
    assert!(lean_drains_at(1750.0));
    assert!(!lean_drains_at(1850.0));
}

#[test]
fn the_burst_reserve_adds_one_replica_at_a_time() {
    let mut p = Policy::new(slo_cfg());
    // A steady 500 tokens/s, but 20000 tokens land within a second: 20000 / (1000 x 2.5 s)
    // = 8 replicas would prefill that within 1.5 s of queueing. The reserve is capped at one
    // over the smallest fleet of its hold.
    let d = p.decide(&with_slo(0.0, 2, 500.0, 0.0, 20_000));
    assert_eq!(d.action, Action::ScaleUp { from: 2, to: 3 }, "{}", d.reason);
    assert!(d.reason.contains("reserve 3.14"), "{}", d.reason);
    let d = p.decide(&with_slo(15.0, 3, 500.0, 0.0, 20_000));
    assert_eq!(d.action, Action::Hold, "{}", d.reason);
    // Three minutes on, the hold's smallest fleet is 3: one more.
    let d = p.decide(&with_slo(200.0, 3, 500.0, 0.0, 20_000));
    assert_eq!(d.action, Action::ScaleUp { from: 3, to: 4 }, "{}", d.reason);
}

#[test]
fn after_a_burst_that_burnt_the_budget_a_short_window_drains_without_cancelling() {
    // The example's short windows (scale-down 30 s, horizon 15 s), on a CPU node where most
    // requests are late: the budget stays overspent. The burst reserve and the guarded
    // look-back are held no longer than the scale-down window, so a drain that window allows
    // is not cancelled by demand the forecast still remembers.
    let mut p = Policy::new(PolicyConfig {
        scale_down_window_seconds: 30.0,
        forecast_horizon_seconds: 15.0,
        ..slo_cfg()
    });
    let mut desired = 3;
    let mut acts = Vec::new();
    for i in 0..=60 {
        let t = i as f64 * 5.0;
        let (tps, late, burst) = if t < 40.0 {
            (2500.0, 2.0, 8000)
        } else {
            (0.0, 0.0, 0)
        };
        let d = p.decide(&with_slo(t, desired, tps, late, burst));
        if d.action != Action::Hold {
            acts.push((t, d.action.clone()));
        }
        desired = d.replicas;
    }
    assert!(
        acts.iter()
            .all(|(_, a)| !matches!(a, Action::CancelDrain { .. })),
        "{acts:?}"
    );
    assert!(desired < 3, "never scaled down: {acts:?}");
}

/// The forecast at the end of `load` (prompt tokens/s every 5 s from t = 0), with the trend
/// fitted to the demand averaged again over `trend_smoothing` seconds.
fn forecast_after(load: impl Fn(f64) -> f64, until: f64, trend_smoothing: f64) -> f64 {
    let mut c = cfg();
    c.trend_window_seconds = 60.0;
    c.trend_smoothing_seconds = trend_smoothing;
    let mut p = Policy::new(c);
    let mut t = 0.0;
    let mut forecast = 0.0;
    while t <= until {
        forecast = p.decide(&obs(t, 8, 1, load(t))).forecast;
        t += 5.0;
    }
    forecast
}

#[test]
fn a_burst_s_first_seconds_are_not_a_ramp() {
    // Two minutes flat at 2 replicas of demand, then a 10 s burst at three times that.
    let burst = |t: f64| if t > 120.0 { 3000.0 } else { 1000.0 };
    let (smoothed, raw) = (
        forecast_after(burst, 130.0, 15.0),
        forecast_after(burst, 130.0, 0.0),
    );
    // The burst's own slope, carried over the 60 s horizon, takes the whole +50% gain.
    assert!(
        raw > smoothed + 0.5,
        "raw slope {raw:.2} vs smoothed {smoothed:.2}"
    );
    // A steady ramp (1000 to 1500 tokens/s over 150 s) has the same slope either way: an
    // average of a straight line is the same line, later.
    let ramp = |t: f64| 1000.0 + 500.0 * (t / 150.0).min(1.0);
    let (smoothed, raw) = (
        forecast_after(ramp, 150.0, 15.0),
        forecast_after(ramp, 150.0, 0.0),
    );
    assert!(
        (smoothed - raw).abs() < 0.05,
        "ramp: smoothed {smoothed:.3} vs raw {raw:.3}"
    );
    assert!(raw > 3.2, "the ramp is projected: {raw:.3}");
}

#[test]
fn scales_down_only_through_a_drain_after_the_window() {
    let mut p = Policy::new(cfg());
    // 3 pods, light load (0.4 replicas of demand) from t=0.
    let mut t = 0.0;
    let mut last = None;
    while t <= 130.0 {
        let d = p.decide(&obs(t, 3, 3, 200.0));
        if d.action != Action::Hold {
            last = Some((t, d));
            break;
        }
        t += 5.0;
    }
    let (t, d) = last.expect("a drain within the window");
    assert!(t >= 120.0, "not before a full window of data: {t}");
    let Action::Drain { pods } = d.action.clone() else {
        panic!("{:?}", d.action)
    };
    // 0.4 replicas of demand fit on one: both others drain at once (max_step 2).
    assert_eq!(pods.len(), 2, "{pods:?}");
    assert_eq!(d.replicas, 3, "replicas drop only once the pods are empty");
    assert_eq!(d.draining, pods);
    let pod = pods[0].clone();
    // Still busy: hold. Empty: scale down.
    let mut o = obs(t + 5.0, 3, 3, 200.0);
    assert_eq!(p.decide(&o).action, Action::Hold);
    // Empty, but in its lame duck: the Service may still send it a request. Hold.
    for v in &mut o.pods {
        if v.name == pod {
            let s = v.signals.as_mut().unwrap();
            (s.running, s.lame_duck) = (0, true);
        }
    }
    o.now = t + 7.0;
    let d = p.decide(&o);
    assert_eq!(d.action, Action::Hold, "{}", d.reason);
    for v in &mut o.pods {
        if v.name == pod {
            v.signals.as_mut().unwrap().lame_duck = false;
        }
    }
    let busy = pods[1].clone();
    for v in &mut o.pods {
        if v.name == busy {
            v.signals.as_mut().unwrap().waiting = 3;
        }
    }
    o.now = t + 10.0;
    let d = p.decide(&o);
    assert_eq!(
        d.action,
        Action::ScaleDown {
            from: 3,
            to: 2,
            pods: vec![pod.clone()]
        },
        "the empty one goes, the one with a queue keeps draining"
    );
    assert_eq!((d.replicas, d.draining.clone()), (2, vec![busy]));
}

/// A new leader (its clock starting at 0) restored from the old one's memory goes on with
/// the old one's drain and sizes by its overspent budget; one started fresh would forget the
/// drain (the operator would then serve the pod again) and size lean.
#[test]
fn a_new_leader_goes_on_with_the_drain_and_the_budget_it_is_handed() {
    let mut p = Policy::new(slo_cfg());
    let mut t = 0.0;
    let drained = loop {
        assert!(t < 400.0, "no drain");
        // 3 replicas, light load, 1 of 20 first tokens a second late: the budget burns.
        let d = p.decide(&with_slo(t, 3, 200.0, 1.0, 0));
        if let Action::Drain { pods } = d.action {
            break pods;
        }
        t += 5.0;
    };
    let m = p.memory(t);
    let late: f64 = m.budget.spans.iter().map(|s| s.late).sum();
    assert!(late > 5.0, "{late}");
    let (mut new, mut fresh) = (Policy::restore(slo_cfg(), &m, 0.0), Policy::new(slo_cfg()));
    assert_eq!(new.draining().collect::<Vec<_>>(), drained);
    assert_eq!(new.scale_down_window(), p.scale_down_window());
    // The drained pods empty; nothing late since. The new leader removes them.
    let mut o = with_slo(5.0, 3, 200.0, 0.0, 0);
    for v in &mut o.pods {
        if drained.contains(&v.name) {
            v.signals.as_mut().expect("reports").running = 0;
        }
    }
    let d = new.decide(&o);
    assert!(
        matches!(&d.action, Action::ScaleDown { from: 3, pods, .. } if *pods == drained),
        "{:?}: {}",
        d.action,
        d.reason
    );
    let f = fresh.decide(&o);
    assert_eq!(f.action, Action::Hold, "{}", f.reason);
    // The budget it was handed is overspent: it sizes guarded; a fresh one knows of nothing
    // late and sizes lean.
    assert!(d.error_budget_burn.expect("an objective") > 1.0, "{d:?}");
    assert_eq!(f.error_budget_burn, Some(0.0));
    assert!(d.forecast > f.forecast, "{} vs {}", d.forecast, f.forecast);
}

/// Decisions that did not happen are missing data: passes that failed while the API server
/// was away, an operator scaled to zero, a history handed over long ago. A window with such a
/// gap in it drains nothing, however light the load on either side: the load in the gap was
/// never seen. Without the check the first pass after a 15-minute gap drained at once, its
/// window holding one sample.
#[test]
fn a_gap_in_the_data_holds_a_drain_until_a_whole_window_is_seen_again() {
    let c = cfg();
    let w = c.scale_down_window_seconds;
    // Light load on one replica (the floor: nothing to drain) for two windows.
    let mut p = Policy::new(c);
    let mut t = 0.0;
    while t <= 2.0 * w {
        p.decide(&obs(t, 1, 1, 100.0));
        t += 5.0;
    }
    // Handed over as it stops (on the same clock: the successor reads the ages back as of
    // then), and nothing for 15 minutes, after which the service runs three replicas
    // (someone scaled it meanwhile) at the same light load: one of them is enough.
    let mut restored = Policy::restore(c, &p.handover(t - 5.0), t - 5.0);
    let resume = t + 900.0;
    for p in [&mut p, &mut restored] {
        let mut t = resume;
        let drained = loop {
            let d = p.decide(&obs(t, 3, 3, 100.0));
            if matches!(d.action, Action::Drain { .. }) {
                break t;
            }
            if t == resume {
                assert!(d.reason.contains("gap in the data"), "{}", d.reason);
            }
            assert!(t < resume + 2.0 * w, "never drained: {}", d.reason);
            t += 5.0;
        };
        assert!(
            drained > resume + w,
            "drained {}s after the gap",
            drained - resume
        );
    }
}

#[test]
fn the_window_after_a_scale_up_runs_from_when_its_pods_turn_ready() {
    let mut p = Policy::new(cfg());
    // 1400 tokens/s at 1000 per replica and 50% target: 2.8 replicas, so 3.
    let d = p.decide(&obs(0.0, 1, 1, 1400.0));
    assert_eq!(d.action, Action::ScaleUp { from: 1, to: 3 }, "{}", d.reason);
    // The burst is over at once; the two new pods load for 60 s, then serve a light load.
    let mut first_drain = None;
    for i in 1..=50 {
        let t = i as f64 * 5.0;
        let mut o = obs(t, 3, 3, 200.0);
        if t < 60.0 {
            for v in o.pods.iter_mut().skip(1) {
                v.phase = PodPhase::Starting;
                v.signals = None;
            }
        }
        let d = p.decide(&o);
        if matches!(d.action, Action::Drain { .. }) {
            first_drain = Some((t, d.reason));
            break;
        }
    }
    let (t, why) = first_drain.expect("a drain once the window has passed");
    // Counted from the scale-up, the window (120 s) and the burst's peak would both have
    // passed by 125 s. The last tick that saw the pods starting was 55 s.
    assert!(t >= 55.0 + 120.0, "drained at {t}: {why}");
    assert!(t <= 55.0 + 120.0 + 10.0, "drained late, at {t}: {why}");
}

/// Ticks every 5 s from `from` to `to` with `tps` spread over the pods, which turn Ready at
/// once and empty as soon as they drain; returns the actions taken and when.
fn drive(p: &mut Policy, from: f64, to: f64, desired: &mut u32, tps: f64) -> Vec<(f64, Action)> {
    let mut acts = vec![];
    let mut t = from;
    while t < to {
        let draining: Vec<String> = p.draining().map(String::from).collect();
        let pods = (0..*desired)
            .map(|i| {
                let name = format!("p{i}");
                let running = u64::from(!draining.contains(&name));
                PodView {
                    signals: Some(signals(tps / *desired as f64, running)),
                    name,
                    phase: PodPhase::Ready,
                }
            })
            .collect();
        let d = p.decide(&Observation {
            now: t,
            desired: *desired,
            pods,
        });
        if let Action::ScaleUp { to, .. } | Action::ScaleDown { to, .. } = d.action {
            *desired = to;
        }
        if d.action != Action::Hold {
            acts.push((t, d.action));
        }
        t += 5.0;
    }
    acts
}

/// The times of the actions that match.
fn times(acts: &[(f64, Action)], matching: fn(&Action) -> bool) -> Vec<f64> {
    acts.iter()
        .filter(|(_, a)| matching(a))
        .map(|(t, _)| *t)
        .collect()
}

#[test]
fn a_scale_down_undone_within_the_window_doubles_it_until_quiet() {
    let mut p = Policy::new(cfg());
    let mut desired = 2;
    // Light load: one pod is drained after the 120 s window and removed once empty.
    let acts = drive(&mut p, 0.0, 200.0, &mut desired, 200.0);
    assert!(
        matches!(acts.last(), Some((_, Action::ScaleDown { to: 1, .. }))),
        "{acts:?}"
    );
    assert_eq!(p.scale_down_window(), 120.0);
    // A burst 75 s after that scale-down: up again, and the window doubles.
    let acts = drive(&mut p, 200.0, 240.0, &mut desired, 2000.0);
    let ups = times(&acts, |a| matches!(a, Action::ScaleUp { .. }));
    let last_up = *ups.last().expect("a scale-up");
    assert_eq!(p.scale_down_window(), 240.0);
    // Light again: no drain until the doubled window has passed since the scale-up.
    let acts = drive(&mut p, 240.0, 600.0, &mut desired, 200.0);
    let drains = times(&acts, |a| matches!(a, Action::Drain { .. }));
    let first_drain = *drains.first().expect("a drain");
    assert!(first_drain >= last_up + 240.0, "{first_drain} vs {last_up}");
    assert_eq!(desired, 1, "{acts:?}");
    assert_eq!(p.scale_down_window(), 240.0, "scaled down just now");
    // Twice the window without any scaling: back to the configured window.
    let last_action = acts.last().unwrap().0;
    assert!(drive(&mut p, 600.0, last_action + 480.0, &mut desired, 200.0).is_empty());
    assert_eq!(
        p.scale_down_window(),
        240.0,
        "not quiet for long enough yet"
    );
    drive(
        &mut p,
        last_action + 480.0,
        last_action + 490.0,
        &mut desired,
        200.0,
    );
    assert_eq!(p.scale_down_window(), 120.0);
}

#[test]
fn a_scale_down_that_reverses_again_waits_four_windows() {
    let mut p = Policy::new(cfg());
    let mut desired = 1;
    // A burst, then light load: up, then down through a drain (the first reversal).
    drive(&mut p, 0.0, 30.0, &mut desired, 2000.0);
    assert!(desired > 1);
    let acts = drive(&mut p, 30.0, 400.0, &mut desired, 200.0);
    let downs = times(&acts, |a| matches!(a, Action::ScaleDown { .. }));
    let (first, last) = (downs[0], *downs.last().unwrap());
    assert_eq!(desired, 1, "{acts:?}");
    // The next burst comes after the window (so the window stays 120 s), and goes.
    let acts = drive(&mut p, last + 150.0, last + 160.0, &mut desired, 2000.0);
    let up = times(&acts, |a| matches!(a, Action::ScaleUp { .. }))[0];
    assert_eq!(p.scale_down_window(), 120.0);
    let acts = drive(&mut p, last + 160.0, last + 700.0, &mut desired, 200.0);
    let drain = *times(&acts, |a| matches!(a, Action::Drain { .. }))
        .first()
        .expect("a drain in the end");
    // The window alone would drain at up + 120 s; the second reversal waits for 4 x 120 s
    // after the first.
    assert!(up + 120.0 < first + 480.0);
    assert!(
        drain >= first + 480.0,
        "drained at {drain}, first down at {first}"
    );
    assert_eq!(desired, 1, "{acts:?}");
}

#[test]
fn jittered_ticks_still_gather_a_whole_scale_down_window() {
    // A real loop ticks every 5 s plus some milliseconds; with the window equal to every
    // other horizon the history must still span it.
    let mut c = cfg();
    c.scale_down_window_seconds = 30.0;
    c.forecast_horizon_seconds = 15.0;
    c.trend_window_seconds = 20.0;
    let mut p = Policy::new(c);
    let mut drained = false;
    for i in 0..30 {
        let d = p.decide(&obs(i as f64 * 5.013, 3, 3, 0.0));
        if matches!(d.action, Action::Drain { .. }) {
            drained = true;
            break;
        }
    }
    assert!(drained, "an idle service never scaled down");
}

#[test]
fn demand_coming_back_cancels_a_drain() {
    let mut p = Policy::new(cfg());
    let mut t = 0.0;
    let pods = loop {
        if let Action::Drain { pods } = p.decide(&obs(t, 3, 3, 200.0)).action {
            break pods;
        }
        t += 5.0;
        assert!(t < 300.0);
    };
    let d = p.decide(&obs(t + 5.0, 3, 3, 1500.0));
    assert_eq!(d.action, Action::CancelDrain { pods });
    assert!(d.draining.is_empty());
    assert!(d.limits.iter().all(|(_, l)| l.max_num_seqs == 32));
}

#[test]
fn a_stale_report_blocks_scale_down_for_a_whole_window() {
    let mut p = Policy::new(cfg());
    for i in 0..=60 {
        let mut o = obs(i as f64 * 5.0, 3, 3, 100.0);
        if i == 20 {
            o.pods[1].signals.as_mut().unwrap().sample_age_seconds = 30.0;
        }
        let d = p.decide(&o);
        let t = o.now;
        if matches!(d.action, Action::Drain { .. }) {
            assert!(
                t >= 100.0 + 120.0,
                "drained at {t}, the stale sample was at 100"
            );
            return;
        }
    }
    panic!("never drained");
}

#[test]
fn unschedulable_pods_are_reported_not_piled_up() {
    let mut p = Policy::new(cfg());
    let mut o = obs(0.0, 3, 2, 4000.0);
    o.pods.push(PodView {
        name: "pending".into(),
        phase: PodPhase::Unschedulable,
        signals: None,
    });
    let d = p.decide(&o);
    assert_eq!(d.action, Action::Hold);
    assert_eq!(d.unschedulable, 1);
    assert!(d.reason.contains("cannot be scheduled"), "{}", d.reason);
}

#[test]
fn the_replicas_are_brought_back_inside_min_and_max() {
    let mut p = Policy::new(cfg());
    let d = p.decide(&obs(0.0, 12, 12, 0.0));
    assert_eq!(d.replicas, 8);
    let d = p.decide(&obs(1.0, 0, 0, 0.0));
    assert_eq!(
        (d.replicas, d.action),
        (1, Action::ScaleUp { from: 0, to: 1 })
    );
}

#[test]
fn an_idle_service_keeps_one_replica_whatever_its_minimum() {
    let mut c = cfg();
    c.min_replicas = 0;
    let mut p = Policy::new(c);
    // Nothing in flight and nothing arriving, for far longer than the scale-down window; the
    // pods drain (and empty) at once.
    let mut desired = 3u32;
    let mut t = 0.0;
    while t < 2000.0 {
        let pods = (0..desired)
            .map(|i| PodView {
                name: format!("p{i}"),
                phase: PodPhase::Ready,
                signals: Some(PodSignals {
                    kv_usage: 0.0,
                    ..signals(0.0, 0)
                }),
            })
            .collect();
        let d = p.decide(&Observation {
            now: t,
            desired,
            pods,
        });
        desired = d.replicas;
        t += 5.0;
    }
    assert_eq!(desired, 1, "the idle spares drain, the last pod stays");
    // Asked for none, it starts one: a service at zero never hears of demand again.
    let d = p.decide(&obs(t, 0, 0, 0.0));
    assert_eq!(d.action, Action::ScaleUp { from: 0, to: 1 }, "{}", d.reason);
    // With no replica allowed at all, it stays at none.
    c.max_replicas = 0;
    let d = Policy::new(c).decide(&obs(0.0, 1, 1, 0.0));
    assert_eq!(d.replicas, 0, "{}", d.reason);
}

/// A random run: per tick the load, whether each pod's report is missing or stale, and how
/// many of the desired pods are still starting.
#[derive(Debug, Clone)]
struct Tick {
    tps: f64,
    missing: bool,
    stale: bool,
    starting: u32,
    dt: f64,
    /// Late first tokens per second over the fleet (counted only for a service with a TTFT
    /// objective), of 20 first tokens per second.
    late: f64,
}

fn tick() -> impl Strategy<Value = Tick> {
    (
        0.0f64..20_000.0,
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
        0u32..3,
        // Now and then no decision for a while (passes that failed, an operator away).
        prop_oneof![19 => 1.0f64..10.0, 1 => 20.5f64..900.0],
        prop_oneof![3 => Just(0.0), 1 => 0.0f64..2.0],
    )
        .prop_map(|(tps, missing, stale, starting, dt, late)| Tick {
            tps,
            missing,
            stale,
            starting,
            dt,
            late,
        })
}

/// Up to ~200 ticks in runs of repeated ones: a load that holds for a while, so the policy
/// sees whole windows of light load (and drains) as well as bursts.
fn runs_of_ticks() -> impl Strategy<Value = Vec<Tick>> {
    prop::collection::vec((tick(), 1usize..30), 1..12).prop_map(|runs| {
        runs.into_iter()
            .flat_map(|(k, n)| std::iter::repeat_n(k, n))
            .take(200)
            .collect()
    })
}

fn observe(t: f64, desired: u32, k: &Tick) -> Observation {
    let starting = k.starting.min(desired);
    let ready = desired - starting;
    let mut pods: Vec<PodView> = (0..ready)
        .map(|i| {
            let share = 1.0 / ready.max(1) as f64;
            let mut s = signals(k.tps * share, (i % 3) as u64);
            s.late_per_second = Some(k.late * share);
            s.first_tokens_per_second = Some(20.0 * share);
            // A burst within each second: the sidecar's arrival curve.
            s.arrival_peaks = vec![ArrivalPeak {
                window_seconds: 1.0,
                tokens: (2.0 * k.tps * share) as u64,
            }];
            if k.stale && i == 0 {
                s.sample_age_seconds = 60.0;
            }
            PodView {
                name: format!("p{i}"),
                phase: PodPhase::Ready,
                signals: (!(k.missing && i == 0)).then_some(s),
            }
        })
        .collect();
    pods.extend((0..starting).map(|i| PodView {
        name: format!("s{i}"),
        phase: PodPhase::Starting,
        signals: None,
    }));
    Observation {
        now: t,
        desired,
        pods,
    }
}

/// Bursts and lulls with clean data at about the operator's 5 s tick: scale-ups, drains and
/// the reversals between them, which the random runs above rarely string together (so the
/// reversal budget is exercised here).
fn bursts() -> impl Strategy<Value = Vec<Tick>> {
    let run = |tps: std::ops::Range<f64>, secs: std::ops::Range<f64>| {
        (tps, secs, 4.5f64..5.5).prop_map(|(tps, secs, dt)| {
            let k = Tick {
                tps,
                missing: false,
                stale: false,
                starting: 0,
                dt,
                late: if tps > 10_000.0 { 1.0 } else { 0.0 },
            };
            vec![k; (secs / dt).ceil() as usize]
        })
    };
    prop::collection::vec(
        (
            run(2_000.0..20_000.0, 5.0..60.0),
            run(0.0..400.0, 30.0..400.0),
        ),
        2..8,
    )
    .prop_map(|cycles| {
        cycles
            .into_iter()
            .flat_map(|(burst, lull)| burst.into_iter().chain(lull))
            .collect()
    })
}

/// Never outside [min, max]; never a drain or a scale-down on a tick with missing or
/// stale data, nor a drain with a gap between decisions in its window; never a drain within
/// the window of a scale-up or of a tick that saw a pod still starting; never a scale-down within the window of a scale-up, nor a scale-up within
/// the cooldown of a scale-down; never a drain that reverses a scale-up within four
/// windows of the last scale-down that did; only one replica removed at a time, and only
/// after a drain of that same pod.
///
/// With `handover` (a tick index and a clock), the policy is replaced after that tick by one
/// restored from its memory, on a clock of its own (a new leader): the invariants hold across.
fn check_invariants(
    ticks: &[Tick],
    min: u32,
    span: u32,
    start: u32,
    trend_smoothing: f64,
    slo: bool,
    handover: Option<(usize, f64)>,
) -> Result<(), TestCaseError> {
    let mut c = cfg();
    c.ttft_objective_seconds = slo.then_some(2.0);
    c.min_replicas = min;
    c.max_replicas = min + span;
    c.trend_smoothing_seconds = trend_smoothing;
    let mut p = Policy::new(c);
    let mut t = 0.0;
    let mut desired = start;
    let (mut last_up, mut last_down): (Option<f64>, Option<f64>) = (None, None);
    let mut drained: Vec<String> = Vec::new();
    // The direction of the last change (true: up) and when a scale-down last reversed one.
    let (mut went_up, mut down_reversal): (Option<bool>, Option<f64>) = (None, None);
    // The last tick that showed a pod still starting.
    let mut last_starting: Option<f64> = None;
    // The end of the last gap between ticks (no decision for longer than the policy's gap
    // limit, twice the time a report goes stale in).
    let mut last_gap: Option<f64> = None;
    // The policy's clock: `t` until the handover, its successor's after.
    let mut clock = 0.0;
    for (i, k) in ticks.iter().enumerate() {
        t += k.dt;
        if i > 0 && k.dt > c.max_gap_seconds() {
            last_gap = Some(t);
        }
        let mut o = observe(t, desired, k);
        if o.pods.iter().any(|v| v.phase == PodPhase::Starting) {
            last_starting = Some(t);
        }
        o.now += clock;
        let d = p.decide(&o);
        if let Some((_, to)) = handover.filter(|&(at, _)| at == i) {
            let m = p.memory(o.now);
            clock = to - t;
            p = Policy::restore(c, &m, t + clock);
        }
        prop_assert!(
            d.replicas >= c.min_replicas && d.replicas <= c.max_replicas,
            "{} outside [{}, {}]",
            d.replicas,
            c.min_replicas,
            c.max_replicas
        );
        let bad_data = k.missing || k.stale;
        let in_bounds = (c.min_replicas..=c.max_replicas).contains(&desired);
        match &d.action {
            Action::ScaleUp { from, to } => {
                prop_assert!(to > from);
                if in_bounds {
                    prop_assert!(to - from <= c.max_step);
                    prop_assert!(
                        last_down.is_none_or(|x| t - x >= c.scale_up_cooldown_seconds),
                        "up at {t} after a down at {last_down:?}"
                    );
                }
                last_up = Some(t);
                went_up = Some(true);
            }
            Action::Drain { pods } => {
                prop_assert!(!bad_data, "drain on missing/stale data at {t}");
                if went_up == Some(true) {
                    prop_assert!(
                        down_reversal.is_none_or(|x| t - x >= 4.0 * c.scale_down_window_seconds),
                        "a reversing drain at {t}, the last reversal down at {down_reversal:?}"
                    );
                }
                prop_assert!(
                    last_up.is_none_or(|x| t - x >= c.scale_down_window_seconds),
                    "drain at {t} within the window of an up at {last_up:?}"
                );
                prop_assert!(
                    last_starting.is_none_or(|x| t - x >= c.scale_down_window_seconds),
                    "drain at {t} within the window of pods starting at {last_starting:?}"
                );
                prop_assert!(
                    last_gap.is_none_or(|x| t - x > c.scale_down_window_seconds),
                    "drain at {t} with a gap in the data ending at {last_gap:?}"
                );
                prop_assert!(!pods.is_empty() && pods.len() as u32 <= c.max_step);
                prop_assert!(desired - pods.len() as u32 >= c.min_replicas.max(1));
                drained = pods.clone();
            }
            Action::ScaleDown { from, to, pods } => {
                prop_assert_eq!(*to + pods.len() as u32, *from);
                for p in pods {
                    prop_assert!(drained.contains(p), "removed {p}, which it did not drain");
                }
                prop_assert!(last_up.is_none_or(|x| t - x >= c.scale_down_window_seconds));
                drained.retain(|d| !pods.contains(d));
                last_down = Some(t);
                if went_up == Some(true) {
                    down_reversal = Some(t);
                }
                went_up = Some(false);
            }
            Action::CancelDrain { .. } => drained.clear(),
            Action::Hold => {}
        }
        if d.replicas < desired && !matches!(d.action, Action::ScaleDown { .. }) {
            // Only the bounds may lower replicas without a drain.
            prop_assert!(desired > c.max_replicas);
            went_up = Some(false);
        }
        desired = d.replicas;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn invariants_hold_on_any_load(
        ticks in runs_of_ticks(),
        min in 0u32..3,
        span in 0u32..6,
        start in 0u32..10,
        trend_smoothing in prop_oneof![Just(0.0), Just(15.0)],
        slo: bool,
    ) {
        check_invariants(&ticks, min, span, start, trend_smoothing, slo, None)?;
    }

    #[test]
    fn invariants_hold_through_bursts_and_lulls(
        ticks in bursts(),
        min in 0u32..3,
        span in 2u32..6,
        start in 0u32..4,
        trend_smoothing in prop_oneof![Just(0.0), Just(15.0)],
        slo: bool,
    ) {
        check_invariants(&ticks, min, span, start, trend_smoothing, slo, None)?;
    }

    /// A new leader restored from the old one's memory, on a clock of its own (behind the
    /// old one's, as a new process's is, or ahead), keeps every invariant across the
    /// handover: no reversal the old one would not have made, no scale-up within the
    /// cooldown of its scale-down, no drain within the window of its scale-up.
    #[test]
    fn invariants_hold_across_a_handover(
        ticks in bursts(),
        min in 0u32..3,
        span in 2u32..6,
        start in 0u32..4,
        at in 0usize..400,
        clock in prop_oneof![Just(0.0), -1000.0f64..1000.0],
        slo: bool,
    ) {
        let at = at % ticks.len();
        check_invariants(&ticks, min, span, start, 15.0, slo, Some((at, clock)))?;
    }

    /// A leader that stops hands its successor the demand history too
    /// (`Policy::handover`): from then on the successor, on a clock of its own, decides
    /// what the old one would have, tick by tick.
    #[test]
    fn a_successor_handed_the_history_decides_as_its_predecessor_would(
        ticks in bursts(),
        start in 0u32..4,
        at in 0usize..400,
        clock in prop_oneof![Just(0.0), (-1000i32..1000).prop_map(f64::from)],
        slo: bool,
    ) {
        let c = PolicyConfig { ttft_objective_seconds: slo.then_some(2.0), ..cfg() };
        let at = at % ticks.len();
        let mut old = Policy::new(c);
        let mut new: Option<Policy> = None;
        let (mut t, mut desired) = (0.0, start);
        for (i, k) in ticks.iter().enumerate() {
            t += k.dt;
            let o = observe(t, desired, k);
            let d = old.decide(&o);
            if let Some(n) = new.as_mut() {
                let mine = n.decide(&Observation { now: o.now + clock, ..o.clone() });
                prop_assert_eq!(&mine.action, &d.action, "tick {} at {}: {} vs {}", i, t, mine.reason, d.reason);
                prop_assert_eq!(mine.replicas, d.replicas);
                prop_assert!((mine.forecast - d.forecast).abs() < 1e-6, "tick {}: {} vs {}: {} / {}", i, mine.forecast, d.forecast, mine.reason, d.reason);
            }
            if i == at {
                new = Some(Policy::restore(c, &old.handover(t), t + clock));
            }
            desired = d.replicas;
        }
    }

    /// Same inputs, same decisions: the operator and the simulator agree.
    #[test]
    fn decisions_are_deterministic(ticks in prop::collection::vec(tick(), 1..60), slo: bool) {
        let c = PolicyConfig { ttft_objective_seconds: slo.then_some(2.0), ..cfg() };
        let (mut a, mut b) = (Policy::new(c), Policy::new(c));
        let (mut t, mut desired) = (0.0, 1);
        for k in &ticks {
            t += k.dt;
            let o = observe(t, desired, k);
            let (da, db) = (a.decide(&o), b.decide(&o));
            prop_assert_eq!(&da, &db);
            desired = da.replicas;
        }
    }
}
