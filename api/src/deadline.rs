//! The order in which an engine admits its waiting requests when it knows their time-to-first-
//! token objective: **every request that can still meet it first, in arrival order; those that
//! cannot behind them, also in arrival order.**
//!
//! Why: under a burst, first-come-first-served spends the engine on requests that are already
//! late, so the ones behind them go late too, and a few seconds of overload cost every request
//! until the queue drains. Serving the ones that can still make it first keeps the damage to
//! the burst's excess; the late ones are not dropped, only served once the on-time ones are
//! through. A late request that has waited `STARVATION_FACTOR` times the objective is served
//! in arrival order again, so sustained overload cannot starve it.
//!
//! Whether a request can still make it is forecast from what the engine measures of its steps:
//! the tokens of everything ahead of it that will be served first plus its own, at the prefill
//! throughput, plus one step (its first token comes out at the end of the step that finishes
//! its prompt, and the chunks round up to whole steps). An optimistic forecast is the costly
//! mistake: the engine would spend itself on requests that then miss by a fraction of a
//! second, the most urgent first. Without a measured rate nothing is judged late and the order is arrival order
//! (vLLM's FCFS). The engine's scheduler and the simulator's engine model both use this.

/// A late request waiting this many objectives is served in arrival order again.
pub const STARVATION_FACTOR: f64 = 10.0;

/// One waiting request, as the order sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Waiting {
    /// Seconds on the caller's clock.
    pub arrival: f64,
    /// Tokens it must compute before its first token (its prompt, less any cached prefix).
    pub prefill_tokens: u64,
    /// It has had its first token already (it was preempted and is recomputing): its TTFT is
    /// settled, and it goes first as it would under FCFS.
    pub started: bool,
}

/// The objective and the engine's throughput, as of now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Deadlines {
    pub ttft_objective_seconds: f64,
    /// Prompt tokens per second the engine computes in full steps; `None` before it knows.
    pub prefill_tokens_per_second: Option<f64>,
    /// How long one such step takes.
    pub step_seconds: f64,
}

impl Deadlines {
    /// Indices into `waiting` (which is in arrival order) in the order to admit them, given
    /// `tokens_ahead` still to prefill for requests already running.
    pub fn admission_order(&self, waiting: &[Waiting], now: f64, tokens_ahead: u64) -> Vec<usize> {
        let rate = match self.prefill_tokens_per_second {
            Some(r) if r > 0.0 && self.ttft_objective_seconds > 0.0 => r,
            _ => return (0..waiting.len()).collect(),
        };
        let objective = self.ttft_objective_seconds;
        let mut ahead = tokens_ahead as f64;
        let (mut on_time, mut late) = (Vec::with_capacity(waiting.len()), Vec::new());
        for (i, w) in waiting.iter().enumerate() {
            let own = w.prefill_tokens as f64;
            let first_token = now + self.step_seconds + (ahead + own) / rate;
            let starved = now - w.arrival >= STARVATION_FACTOR * objective;
            if w.started || starved || first_token <= w.arrival + objective {
                ahead += own;
                on_time.push(i);
            } else {
                late.push(i);
            }
        }
        on_time.extend(late);
        on_time
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(arrival: f64, tokens: u64) -> Waiting {
        Waiting {
            arrival,
            prefill_tokens: tokens,
            started: false,
        }
    }

    const D: Deadlines = Deadlines {
        ttft_objective_seconds: 2.0,
        prefill_tokens_per_second: Some(1000.0),
        step_seconds: 0.0,
    };

    #[test]
    fn without_a_rate_or_an_objective_the_order_is_arrival() {
        let q = [w(0.0, 5000), w(1.0, 10), w(2.0, 10)];
        let none = Deadlines {
            prefill_tokens_per_second: None,
            ..D
        };
        assert_eq!(none.admission_order(&q, 50.0, 0), vec![0, 1, 2]);
        let zero = Deadlines {
            ttft_objective_seconds: 0.0,
            ..D
        };
        assert_eq!(zero.admission_order(&q, 50.0, 0), vec![0, 1, 2]);
    }

    #[test]
    fn a_request_that_cannot_make_it_waits_behind_those_that_can() {
        // At 1000 tokens/s: request 0 already waited 1.5 s and needs 1 s more; 1 and 2 make it.
        let q = [w(0.0, 1000), w(1.0, 500), w(1.4, 500)];
        assert_eq!(D.admission_order(&q, 1.5, 0), vec![1, 2, 0]);
        // 600 tokens still to prefill for running requests: 1 comes at 2.6 <= 3.0, 2 at
        // 3.1 <= 3.4.
        assert_eq!(D.admission_order(&q, 1.5, 600), vec![1, 2, 0]);
        // 1200 ahead: 1 would come at 3.2 > 3.0, late; 2 then at 3.2 <= 3.4.
        assert_eq!(D.admission_order(&q, 1.5, 1200), vec![2, 0, 1]);
    }

    #[test]
    fn the_step_that_yields_the_first_token_counts() {
        // At 2.1 s, 0 is late; 1 needs 0.7 s of prefill with 0.9 s of its 2 s left: on time in
        // a continuous forecast, late once the 0.25 s step it comes out of is counted.
        let q = [w(0.0, 100), w(1.0, 700)];
        assert_eq!(D.admission_order(&q, 2.1, 0), vec![1, 0]);
        let stepped = Deadlines {
            step_seconds: 0.25,
            ..D
        };
        assert_eq!(stepped.admission_order(&q, 2.1, 0), vec![0, 1]);
    }

    #[test]
    fn a_late_request_does_not_count_against_the_ones_behind_it() {
        // 0 is hopeless (10,000 tokens); were it counted ahead, 1 would be late too.
        let q = [w(0.0, 10_000), w(0.1, 1000)];
        assert_eq!(D.admission_order(&q, 0.2, 0), vec![1, 0]);
    }

    #[test]
    fn started_and_starved_requests_keep_their_place() {
        let mut started = w(0.0, 10_000);
        started.started = true;
        let q = [started, w(19.0, 100)];
        assert_eq!(D.admission_order(&q, 19.5, 0), vec![0, 1]);
        // Waited 20 s = 10 objectives: served in arrival order again.
        let q = [w(0.0, 10_000), w(19.0, 100)];
        assert_eq!(D.admission_order(&q, 20.0, 0), vec![0, 1]);
        assert_eq!(D.admission_order(&q, 19.9, 0), vec![1, 0]);
    }

    proptest::proptest! {
        /// Whatever the queue: a permutation, each group in arrival order, the late after the
        /// on-time, and every request judged on time really is forecast to make it.
        #[test]
        fn the_order_is_a_permutation_in_two_arrival_ordered_runs(
            mut q in proptest::collection::vec((0.0f64..30.0, 0u64..5000, proptest::bool::weighted(0.1)), 0..40),
            now_after in 0.0f64..10.0,
            ahead in 0u64..5000,
        ) {
            q.sort_by(|a, b| a.0.total_cmp(&b.0));
            let q: Vec<Waiting> = q.into_iter().map(|(a, t, s)| Waiting { arrival: a, prefill_tokens: t, started: s }).collect();
            let now = q.last().map_or(0.0, |w| w.arrival) + now_after;
            let order = D.admission_order(&q, now, ahead);
            let mut sorted = order.clone();
            sorted.sort();
            proptest::prop_assert_eq!(sorted, (0..q.len()).collect::<Vec<_>>());
            let rate = D.prefill_tokens_per_second.unwrap();
            let mut ahead = ahead as f64;
            let mut seen_late = false;
            let mut last = [None::<usize>; 2];
            for &i in &order {
                let w = q[i];
                let starved = now - w.arrival >= STARVATION_FACTOR * D.ttft_objective_seconds;
                let on_time = w.started || starved
                    || now + D.step_seconds + (ahead + w.prefill_tokens as f64) / rate <= w.arrival + D.ttft_objective_seconds;
                if on_time {
                    proptest::prop_assert!(!seen_late, "an on-time request after a late one");
                    ahead += w.prefill_tokens as f64;
                } else {
                    seen_late = true;
                }
                let group = usize::from(!on_time);
                proptest::prop_assert!(last[group].is_none_or(|l| l < i), "arrival order within a group");
                last[group] = Some(i);
            }
        }
    }
}
