//! The targets, checked on a set of replays of one trace: per replay, redline against
//! the oracle, the oracle held to the reversal cap, the HPA tuned to the SLO and the oracle's
//! sizing without its foresight, and which targets it misses. `redline-sim --targets` prints it, so the state of the targets is one
//! command, not a table copied by hand.

use crate::compare::{Comparison, Row};
use crate::report::Summary;

/// One replay of the trace: its time compression, token scale and cold start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scenario {
    pub time_compression: f64,
    pub token_scale: f64,
    pub cold_start_seconds: f64,
    /// One the targets are set on (the whole hour at x1 and x4, cold start 60 s and 120 s),
    /// or one held out to show the policy was not tuned to those.
    pub target: bool,
}

impl Scenario {
    const fn new(time_compression: f64, token_scale: f64, cold_start: f64, target: bool) -> Self {
        Self {
            time_compression,
            token_scale,
            cold_start_seconds: cold_start,
            target,
        }
    }

    pub fn label(&self) -> String {
        let mut s = format!("x{}", self.time_compression);
        if self.token_scale != 1.0 {
            s += &format!(", tokens x{}", self.token_scale);
        }
        s + &format!(", cold start {} s", self.cold_start_seconds)
    }
}

/// The four replays the targets are set on, then the held-out ones: other compressions and
/// every prompt and output scaled.
pub const SCENARIOS: [Scenario; 11] = [
    Scenario::new(1.0, 1.0, 60.0, true),
    Scenario::new(1.0, 1.0, 120.0, true),
    Scenario::new(4.0, 1.0, 60.0, true),
    Scenario::new(4.0, 1.0, 120.0, true),
    Scenario::new(2.0, 1.0, 60.0, false),
    Scenario::new(3.0, 1.0, 60.0, false),
    Scenario::new(3.0, 1.0, 120.0, false),
    Scenario::new(1.0, 1.5, 60.0, false),
    Scenario::new(1.0, 2.0, 60.0, false),
    Scenario::new(4.0, 1.5, 60.0, false),
    Scenario::new(4.0, 2.0, 60.0, false),
];

/// The numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Targets {
    pub ttft_attainment: f64,
    pub max_vs_oracle: f64,
    /// Replica-seconds saved against the HPA on queue length at equal or better attainment.
    pub min_saving_vs_hpa: f64,
    pub max_reversals_per_10_min: f64,
}

pub const TARGETS: Targets = Targets {
    ttft_attainment: 0.99,
    max_vs_oracle: 1.15,
    min_saving_vs_hpa: 0.30,
    max_reversals_per_10_min: 1.0,
};

/// redline on one replay, and what it is measured against.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub scenario: Scenario,
    pub redline: Summary,
    pub hpa: Summary,
    pub capped_oracle_replica_seconds: f64,
    pub oracle_replica_seconds: f64,
    /// The oracle's sizing without its foresight, with the fewest spare replicas that meet
    /// the attainment target (`late_spare`): about the least a policy that reacts pays.
    pub late_oracle: Summary,
    pub late_spare: u32,
}

impl Check {
    pub fn new(scenario: Scenario, c: &Comparison) -> Self {
        Self {
            scenario,
            redline: c.row(Row::Redline).clone(),
            hpa: c.row(Row::HpaTuned).clone(),
            capped_oracle_replica_seconds: c.row(Row::CappedOracle).replica_seconds,
            oracle_replica_seconds: c.row(Row::Oracle).replica_seconds,
            late_oracle: c.row(Row::LateOracle).clone(),
            late_spare: c.late_spare,
        }
    }

    /// redline against the late oracle: "1.02x (+1)", or how far the late oracle falls short.
    pub fn vs_late_oracle(&self, t: &Targets) -> String {
        let late = &self.late_oracle;
        if late.ttft_attainment < t.ttft_attainment {
            return format!(
                "none meets {:.0}% (+{}: {:.2}%)",
                t.ttft_attainment * 100.0,
                self.late_spare,
                late.ttft_attainment * 100.0
            );
        }
        format!(
            "{:.2}x (+{})",
            self.redline.replica_seconds / late.replica_seconds.max(1e-9),
            self.late_spare
        )
    }

    pub fn vs_oracle(&self) -> f64 {
        self.redline.replica_seconds / self.oracle_replica_seconds.max(1e-9)
    }

    /// Share of the tuned HPA's replica-seconds redline saves; `None` when no HPA target
    /// reaches the attainment target, so there is no cost at equal attainment to compare.
    pub fn saving_vs_hpa(&self, t: &Targets) -> Option<f64> {
        (self.hpa.ttft_attainment >= t.ttft_attainment)
            .then(|| 1.0 - self.redline.replica_seconds / self.hpa.replica_seconds.max(1e-9))
    }

    /// The targets this replay misses, in the words.
    pub fn missed(&self, t: &Targets) -> Vec<&'static str> {
        let r = &self.redline;
        let mut out = Vec::new();
        if r.ttft_attainment < t.ttft_attainment {
            out.push("TTFT attainment");
        }
        if r.redline_events > 0 {
            out.push("redline events");
        }
        if r.failed > 0 {
            out.push("failed requests");
        }
        if self.vs_oracle() > t.max_vs_oracle {
            out.push("cost vs oracle");
        }
        // Equal attainment: both meet the target (an HPA tuned to it lands just above).
        let met = r.ttft_attainment >= t.ttft_attainment;
        if self
            .saving_vs_hpa(t)
            .is_some_and(|s| !met || s < t.min_saving_vs_hpa)
        {
            out.push("saving vs HPA");
        }
        // Per 10 minutes read both ways: within any 10 minutes, and as a rate over the replay
        // where it lasts that long (a shorter one with one reversal is not over the cap).
        let max = t.max_reversals_per_10_min;
        if f64::from(r.most_reversals_in_10_min) > max
            || (r.duration_seconds >= 600.0 && r.reversals_per_10_min() > max)
        {
            out.push("reversals");
        }
        out
    }
}

/// One markdown table of the checks.
pub fn table(checks: &[Check], t: &Targets) -> String {
    let mut s = format!(
        "| replay | | TTFT SLO | redline events | failed | replica-s | vs oracle | vs capped oracle | vs tuned HPA | reversals /10 min (most in 10 min) | vs late oracle + spares | missed (>= {:.0}%, 0, 0, <= {:.2}x, >= {:.0}% saved, <= {:.0}) |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|\n",
        t.ttft_attainment * 100.0,
        t.max_vs_oracle,
        t.min_saving_vs_hpa * 100.0,
        t.max_reversals_per_10_min,
    );
    for c in checks {
        let r = &c.redline;
        let hpa = match c.saving_vs_hpa(t) {
            Some(saving) => format!("{:.0}% fewer ({})", saving * 100.0, c.hpa.name),
            None => format!(
                "no HPA target meets {:.0}% (best {:.2}%)",
                t.ttft_attainment * 100.0,
                c.hpa.ttft_attainment * 100.0
            ),
        };
        let missed = c.missed(t);
        s += &format!(
            "| {} | {} | {:.2}% | {} | {} | {:.0} | {:.2}x | {:.2}x | {} | {:.2} ({}) | {} | {} |\n",
            c.scenario.label(),
            if c.scenario.target {
                "target"
            } else {
                "held out"
            },
            r.ttft_attainment * 100.0,
            r.redline_events,
            r.failed,
            r.replica_seconds,
            c.vs_oracle(),
            r.replica_seconds / c.capped_oracle_replica_seconds.max(1e-9),
            hpa,
            r.reversals_per_10_min(),
            r.most_reversals_in_10_min,
            c.vs_late_oracle(t),
            if missed.is_empty() {
                "none".to_string()
            } else {
                missed.join(", ")
            },
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(name: &str, attainment: f64, replica_seconds: f64) -> Summary {
        Summary {
            name: name.into(),
            requests: 1000,
            ttft_attainment: attainment,
            itl_attainment: 1.0,
            ttft_p99_seconds: 1.0,
            replica_seconds,
            redline_events: 0,
            failed: 0,
            scale_actions: 4,
            reversals: 1,
            duration_seconds: 1200.0,
            most_reversals_in_10_min: 1,
            peak_kv_usage: 0.2,
            guard_actions: 0,
        }
    }

    fn check(redline: Summary, hpa: Summary, oracle: f64) -> Check {
        Check {
            scenario: SCENARIOS[0],
            redline,
            hpa,
            capped_oracle_replica_seconds: oracle,
            oracle_replica_seconds: oracle,
            late_oracle: summary("oracle, a cold start late, +1", 0.995, oracle * 1.2),
            late_spare: 1,
        }
    }

    /// 99.5% at 1.10x the oracle, 45% under an HPA that meets 99%.
    fn within_every_target() -> Check {
        check(
            summary("redline", 0.995, 1100.0),
            summary("HPA", 0.992, 2000.0),
            1000.0,
        )
    }

    #[test]
    fn a_replay_within_every_target_misses_none() {
        let c = within_every_target();
        assert_eq!(c.missed(&TARGETS), Vec::<&str>::new());
        assert!((c.saving_vs_hpa(&TARGETS).unwrap() - 0.45).abs() < 1e-9);
        assert_eq!(c.vs_late_oracle(&TARGETS), "0.92x (+1)");
        assert!(table(&[c], &TARGETS).contains("| none |"));
    }

    #[test]
    fn each_target_is_missed_on_its_own() {
        let ok = within_every_target();
        let mut c = ok.clone();
        c.redline.ttft_attainment = 0.985;
        assert_eq!(c.missed(&TARGETS), ["TTFT attainment", "saving vs HPA"]);
        let mut c = ok.clone();
        c.redline.redline_events = 1;
        c.redline.failed = 2;
        assert_eq!(c.missed(&TARGETS), ["redline events", "failed requests"]);
        let mut c = ok.clone();
        c.redline.replica_seconds = 1200.0;
        assert_eq!(c.missed(&TARGETS), ["cost vs oracle"]);
        let mut c = ok.clone();
        c.hpa.replica_seconds = 1500.0;
        assert_eq!(c.missed(&TARGETS), ["saving vs HPA"]);
        let mut c = ok.clone();
        // Three in 20 minutes, never two within 10: over the cap as a rate (1.5).
        c.redline.reversals = 3;
        assert_eq!(c.missed(&TARGETS), ["reversals"]);
        let mut c = ok;
        c.redline.most_reversals_in_10_min = 2;
        assert_eq!(c.missed(&TARGETS), ["reversals"]);
    }

    #[test]
    fn one_reversal_in_a_replay_under_10_minutes_is_within_the_cap() {
        let mut c = within_every_target();
        c.redline.duration_seconds = 571.0;
        assert!(c.redline.reversals_per_10_min() > 1.0);
        assert!(c.missed(&TARGETS).is_empty());
    }

    #[test]
    fn an_hpa_that_never_meets_the_slo_has_no_cost_to_compare() {
        let c = check(
            summary("redline", 0.995, 1100.0),
            summary("HPA", 0.96, 900.0),
            1000.0,
        );
        assert_eq!(c.saving_vs_hpa(&TARGETS), None);
        assert!(c.missed(&TARGETS).is_empty());
        assert!(table(&[c], &TARGETS).contains("no HPA target meets 99% (best 96.00%)"));
    }

    #[test]
    fn a_late_oracle_short_of_the_target_is_no_cost_to_compare() {
        let mut c = within_every_target();
        c.late_oracle.ttft_attainment = 0.985;
        c.late_spare = 4;
        assert_eq!(c.vs_late_oracle(&TARGETS), "none meets 99% (+4: 98.50%)");
        assert!(c.missed(&TARGETS).is_empty());
    }
}
