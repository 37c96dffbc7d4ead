//! `redline-sim`: replay a request trace against redline's policy and today's autoscalers, print
//! one table, write one PNG.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use redline_autoscale::defaults;
use redline_sim::compare::{budget_oracle, compare, Row, Setup};
use redline_sim::fleet::{Queue, Slo};
use redline_sim::profile::EngineProfile;
use redline_sim::report::{summarize, table};
use redline_sim::scalers::Handover;
use redline_sim::targets::{self, Check, SCENARIOS, TARGETS};
use redline_sim::trace::{self, Replay, Request};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Trace CSV in the Azure format (TIMESTAMP,ContextTokens,GeneratedTokens).
    #[arg(long, default_value = "sim/traces/azure-llm-2023-code.csv")]
    trace: PathBuf,
    /// Engine profile: gpu-8b (Llama-3.1-8B on an H100 under vLLM), gpu-8b-bare (its bare GPU
    /// work, measured on an H100) or cpu-smollm2 (our engine).
    #[arg(long, default_value = "gpu-8b")]
    profile: String,
    /// Divide arrival times by this (4: an hour in 15 minutes).
    #[arg(long, default_value_t = 1.0)]
    time_compression: f64,
    /// Multiply prompt and output lengths by this.
    #[arg(long, default_value_t = 1.0)]
    token_scale: f64,
    /// Replay only the first this-many seconds (after compression).
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds from pod creation to Ready (model load).
    #[arg(long, default_value_t = 60.0)]
    cold_start: f64,
    #[arg(long, default_value_t = 2.0)]
    ttft_slo: f64,
    /// Per-request mean inter-token latency objective, seconds.
    #[arg(long, default_value_t = 0.1)]
    itl_slo: f64,
    /// Two by default: a service people depend on does not run on one pod.
    #[arg(long, default_value_t = 2)]
    min_replicas: u32,
    #[arg(long, default_value_t = 16)]
    max_replicas: u32,
    /// Share of each replica's measured capacity redline plans to use. Default: the operator's
    /// (0.7 on deadline engines, 0.6 in arrival order).
    #[arg(long)]
    target_utilization: Option<f64>,
    /// How long the peak demand must fit on one replica fewer before one is drained.
    #[arg(long, default_value_t = defaults::SCALE_DOWN_WINDOW_SECONDS)]
    scale_down_window: f64,
    /// Demand is averaged over this many seconds (bursts shorter wait in the queue).
    #[arg(long, default_value_t = defaults::DEMAND_SMOOTHING_SECONDS)]
    demand_smoothing: f64,
    /// Window the demand trend is fitted over (0: no trend term).
    #[arg(long, default_value_t = defaults::TREND_WINDOW_SECONDS)]
    trend_window: f64,
    /// The trend is fitted to the demand averaged again over this many seconds (0: to the
    /// demand itself).
    #[arg(long, default_value_t = defaults::TREND_SMOOTHING_SECONDS)]
    trend_smoothing: f64,
    /// The queued backlog counts as the rate that clears it in this many seconds. Default: the
    /// forecast horizon, as the operator sets it.
    #[arg(long)]
    backlog_drain: Option<f64>,
    /// How far ahead redline forecasts demand (the AutoscalingPolicy's
    /// `forecastHorizonSeconds`). Default: the cold start, as it should be set
    #[arg(long)]
    forecast_horizon: Option<f64>,
    /// The operator's decision interval, seconds.
    #[arg(long, default_value_t = 5.0)]
    policy_interval: f64,
    #[arg(long, default_value_t = 60.0)]
    oracle_window: f64,
    /// How redline's engines (and the oracle's) queue: deadline (given the TTFT objective, as
    /// the operator passes spec.slo.ttftP99Ms) or fcfs.
    #[arg(long, value_enum, default_value = "deadline")]
    queue: Queue,
    /// How the baselines' engines queue: fcfs, as vLLM does; deadline compares the policies
    /// alone, on the same engines.
    #[arg(long, value_enum, default_value = "fcfs")]
    baseline_queue: Queue,
    /// Where the PNG goes.
    #[arg(long, default_value = "target/redline-sim.png")]
    plot: PathBuf,
    /// Also print every redline decision that changed something, with its reason.
    #[arg(long)]
    explain: bool,
    /// Instead of one replay: the targets checked on the four target replays (x1 and
    /// x4, cold start 60 s and 120 s) and seven held-out ones, one table (the other flags
    /// still set the profile, SLO and policy).
    #[arg(long)]
    targets: bool,
    /// Also run the clairvoyant oracle that spends the error budget over the whole replay
    /// (greedy; seconds at x4, a minute or more at x1) and print it after the table.
    #[arg(long)]
    budget_oracle: bool,
    /// The operator fails over to a new leader at these times (seconds into the replay,
    /// comma-separated): by default the old one stops (a `helm upgrade`, a drained node) and
    /// hands over its memory and demand history, as the operator does.
    #[arg(long, value_delimiter = ',')]
    failover: Vec<f64>,
    /// The old leader is lost instead (its node died): the new one goes on from the memory
    /// kept in status, without the demand history.
    #[arg(long, conflicts_with = "failover_without_memory")]
    failover_lost_leader: bool,
    /// The new leader starts with nothing, as before `status.autoscalerMemory`.
    #[arg(long)]
    failover_without_memory: bool,
    /// Seconds from a failover to the new leader's first decision (the Lease changing hands
    /// and its first list; nothing decides meanwhile).
    #[arg(long, default_value_t = 0.0)]
    failover_takeover: f64,
    /// Replay the trace's first this-many seconds once before it, uncounted, so every policy
    /// meets the trace on a fleet the same load has already shaped (its pools filled, its
    /// memory of demand): a service that was running before the excerpt begins. Without it
    /// the replay starts on idle engines sized for the first minutes. Times printed count
    /// from the end of the warm-up.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    warm_up: f64,
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v >= 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds >= 0")),
    }
}

fn queue_name(q: Queue) -> String {
    use clap::ValueEnum;
    q.to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_string())
}

/// The trace, replayed at this compression and token scale, with at least one request.
fn read_trace(a: &Args, time_compression: f64, token_scale: f64) -> Result<Vec<Request>> {
    let trace = trace::read(
        &a.trace,
        Replay {
            time_compression,
            token_scale,
            duration: a.duration,
        },
    )?;
    if trace.is_empty() {
        bail!("no requests in {} within the duration", a.trace.display());
    }
    Ok(trace)
}

/// The comparison for a cold start, with the policy's knobs from the flags.
fn setup(a: &Args, profile: &EngineProfile, cold_start: f64) -> Setup {
    let slo = Slo {
        ttft_seconds: a.ttft_slo,
        itl_seconds: a.itl_slo,
    };
    let mut setup = Setup::new(
        profile.clone(),
        cold_start,
        slo,
        a.min_replicas,
        a.max_replicas,
    );
    let p = &mut setup.policy;
    p.target_utilization = a.target_utilization.unwrap_or_else(|| {
        redline_autoscale::default_target_utilization(a.queue == Queue::Deadline)
    });
    p.scale_down_window_seconds = a.scale_down_window;
    p.trend_window_seconds = a.trend_window;
    p.trend_smoothing_seconds = a.trend_smoothing;
    p.demand_smoothing_seconds = a.demand_smoothing;
    if let Some(h) = a.forecast_horizon {
        // As the operator sets them from the policy's one field.
        p.forecast_horizon_seconds = h;
        p.backlog_drain_seconds = h;
    }
    if let Some(b) = a.backlog_drain {
        p.backlog_drain_seconds = b;
    }
    setup.policy_interval_seconds = a.policy_interval;
    setup.oracle_window_seconds = a.oracle_window;
    setup.sim.queue = a.queue;
    // The operator gives the engines the objective, which puts them in deadline order.
    if a.queue != Queue::Deadline {
        setup.policy.ttft_objective_seconds = None;
    }
    setup.baseline_queue = a.baseline_queue;
    setup.failovers = a.failover.clone();
    setup.takeover_seconds = a.failover_takeover;
    setup.sim.measure_from_seconds = a.warm_up;
    setup.handover = if a.failover_without_memory {
        Handover::Fresh
    } else if a.failover_lost_leader {
        Handover::Memory
    } else {
        Handover::Stopped
    };
    setup
}

/// `--targets`: every scenario compared, redline checked against the targets.
fn check_targets(a: &Args, profile: &EngineProfile) -> Result<()> {
    println!(
        "the issue's targets on {}, profile {}, SLO TTFT <= {} s, ITL <= {} ms{}",
        a.trace.display(),
        profile.name,
        a.ttft_slo,
        a.itl_slo * 1000.0,
        if a.warm_up > 0.0 {
            format!("; each replay after a warm-up of its first {} s", a.warm_up)
        } else {
            String::new()
        }
    );
    let pb = ProgressBar::new(SCENARIOS.len() as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>14} [{bar:40}] {pos}/{len} replays ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message("targets");
    let mut checks = Vec::new();
    for s in SCENARIOS {
        let trace = read_trace(a, s.time_compression, s.token_scale)?;
        let replay = trace::with_warm_up(&trace, a.warm_up);
        let c = compare(&replay, &setup(a, profile, s.cold_start_seconds), None);
        checks.push(Check::new(s, &c));
        pb.inc(1);
    }
    pb.finish_and_clear();
    print!("\n{}", targets::table(&checks, &TARGETS));
    let meets: Vec<bool> = checks
        .iter()
        .map(|c| c.missed(&TARGETS).is_empty())
        .collect();
    let target_replays = || checks.iter().zip(&meets).filter(|(c, _)| c.scenario.target);
    println!(
        "\n{} of {} replays meet every target ({} of {} target replays)",
        meets.iter().filter(|&&m| m).count(),
        meets.len(),
        target_replays().filter(|(_, &m)| m).count(),
        target_replays().count(),
    );
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    let Some(profile) = EngineProfile::by_name(&a.profile) else {
        bail!(
            "unknown profile {:?}: gpu-8b, gpu-8b-bare or cpu-smollm2",
            a.profile
        );
    };
    if a.targets {
        return check_targets(&a, &profile);
    }
    let trace = read_trace(&a, a.time_compression, a.token_scale)?;
    let setup = setup(&a, &profile, a.cold_start);
    let capacity = profile.capacity();
    let span = trace.last().map_or(0.0, |r| r.arrival);
    // What the policies run through: the trace, after its warm-up (if any).
    let replay = trace::with_warm_up(&trace, a.warm_up);
    let warm_up_requests = replay.len() - trace.len();
    println!(
        "{} requests over {:.0} s from {} (x{} time, x{} tokens); profile {}: {:.0} prompt + {:.0} generated tokens/s per replica, {} KV tokens; cold start {} s; SLO TTFT <= {} s, ITL <= {} ms; engines queue {} (redline, oracle), {} (baselines)",
        trace.len(),
        span,
        a.trace.display(),
        a.time_compression,
        a.token_scale,
        profile.name,
        capacity.prompt_tokens_per_second,
        capacity.generation_tokens_per_second,
        profile.kv_tokens(),
        a.cold_start,
        a.ttft_slo,
        a.itl_slo * 1000.0,
        queue_name(a.queue),
        queue_name(a.baseline_queue),
    );
    if a.warm_up > 0.0 {
        println!(
            "warm-up: the first {:.0} s ({warm_up_requests} requests) replayed once before, uncounted; times count from its end; the oracle's windows below include it",
            a.warm_up
        );
    }
    let mp = MultiProgress::new();
    let c = compare(&replay, &setup, Some(&mp));
    let oracle = Some(c.row(Row::Oracle).replica_seconds);
    println!();
    print!("{}", table(&c.rows, oracle));
    println!(
        "\nbest static: {} replicas; oracle per {:.0} s window: {:?}",
        c.static_replicas, setup.oracle_window_seconds, c.oracle_schedule
    );
    println!(
        "oracle under the reversal cap, replicas asked for per window: {:?}",
        c.capped_schedule
    );
    let spent = a
        .budget_oracle
        .then(|| budget_oracle(&replay, &setup, c.oracle_schedule.clone()));
    if let Some((schedule, o)) = &spent {
        let s = summarize(o, &setup.sim.slo);
        println!(
            "oracle spending the error budget, per {:.0} s window: {schedule:?}: TTFT SLO {:.2}%, {:.0} replica-s, {:.2}x the oracle; redline {:.2}x of it",
            setup.oracle_window_seconds,
            s.ttft_attainment * 100.0,
            s.replica_seconds,
            s.replica_seconds / c.row(Row::Oracle).replica_seconds,
            c.row(Row::Redline).replica_seconds / s.replica_seconds
        );
    }
    if a.explain {
        println!("\nredline's decisions:");
        for line in &c.redline_decisions {
            println!("  {line}");
        }
    }
    for o in &c.outcomes {
        if a.explain {
            let p = redline_sim::report::pools(o);
            println!(
                "{}: KV usage {:.1}% on average, the fullest pool {:.1}%; mean inter-token latency {:.1} ms; load {:.2} replicas' worth",
                o.name,
                p.mean_kv_usage * 100.0,
                p.mean_fullest_kv_usage * 100.0,
                p.mean_inter_token_latency_seconds * 1000.0,
                p.mean_load
            );
        }
        if !o.scale_events.is_empty() {
            let at: Vec<String> = o
                .scale_events
                .iter()
                .map(|(t, n)| format!("{:.1}:{n}", t / 60.0))
                .collect();
            println!("{}: replicas from minute {}", o.name, at.join(" "));
        }
        let mut by_minute = std::collections::BTreeMap::<u32, u32>::new();
        for r in &o.requests {
            if !r.ttft().is_some_and(|t| t <= a.ttft_slo) {
                *by_minute.entry((r.arrival / 60.0) as u32).or_default() += 1;
            }
        }
        if !by_minute.is_empty() {
            let list: Vec<String> = by_minute.iter().map(|(m, n)| format!("{m}:{n}")).collect();
            println!("{}: TTFT misses by minute {}", o.name, list.join(" "));
        }
    }
    if let Some(dir) = a.plot.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let runs: Vec<_> = c
        .outcomes
        .iter()
        .chain(spent.iter().map(|(_, o)| o))
        .collect();
    redline_sim::plot::write(
        &a.plot,
        &format!(
            "{} on {}, cold start {} s{}",
            profile.name,
            a.trace.file_name().unwrap_or_default().to_string_lossy(),
            a.cold_start,
            if a.warm_up > 0.0 {
                format!(", after a {} s warm-up", a.warm_up)
            } else {
                String::new()
            }
        ),
        // The outcomes' times count from the end of the warm-up: the trace's own.
        &trace,
        &runs,
    )?;
    println!("plot: {}", a.plot.display());
    Ok(())
}
