//! When an engine may admit a request while others run. Two lines bound the pool at admission:
//! - the watermark: admitting into the last blocks would only push a running sequence into
//!   preemption a step later (vLLM v0's block manager keeps the same 1%);
//! - the KV line (`max_kv_usage`, which the sidecar sets to its guard's redline): the
//!   guard sees the pool only every scrape, and one prompt admitted between two scrapes can
//!   carry a small pool from under the redline to its last block. An admission never crosses
//!   it; only the running sequences' own growth can, and that is what the guard's forecast
//!   watches.
//!
//! A lone request may take the whole pool (else a prompt longer than the ceiling would wait
//! forever). The engine's scheduler and the simulator's engine model both use this.

/// Blocks to leave free at admission in a pool of `num_blocks`: 1%, at least one.
pub fn watermark_blocks(num_blocks: usize) -> usize {
    (num_blocks / 100).max(1).min(num_blocks)
}

/// The most blocks an admission may leave in use while others run: under `max_kv_usage` of
/// the pool (strictly, so a pool filled by admission never reads as at the redline) and
/// above the watermark.
pub fn max_admitted_blocks(num_blocks: usize, max_kv_usage: f64) -> usize {
    let under_line =
        ((num_blocks as f64 * max_kv_usage.clamp(0.0, 1.0)).ceil() as usize).saturating_sub(1);
    under_line.min(num_blocks - watermark_blocks(num_blocks))
}

/// Whether a request needing `need` more blocks may be admitted with `used` in use.
pub fn admits(
    num_blocks: usize,
    used: usize,
    need: usize,
    others_running: bool,
    max_kv_usage: f64,
) -> bool {
    !others_running || used + need <= max_admitted_blocks(num_blocks, max_kv_usage)
}

/// Whether `r` is a share of the KV pool a line may be drawn at, in (0, 1]: the engine's
/// `max_kv_usage`, and the guard's redline, which the sidecar passes on as it.
pub fn valid_kv_share(r: f64) -> bool {
    r > 0.0 && r <= 1.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_percent_at_least_one_never_more_than_the_pool() {
        assert_eq!(watermark_blocks(0), 0);
        assert_eq!(watermark_blocks(6), 1);
        assert_eq!(watermark_blocks(100), 1);
        assert_eq!(watermark_blocks(26_624), 266);
    }

    #[test]
    fn admission_stays_under_the_line_and_the_watermark() {
        // At 1.0, the watermark alone: today's admission.
        assert_eq!(max_admitted_blocks(72, 1.0), 71);
        assert_eq!(max_admitted_blocks(26_624, 1.0), 26_358);
        // 72 blocks at 0.9: 64.8, so 64 (0.889) is the most an admission leaves.
        assert_eq!(max_admitted_blocks(72, 0.9), 64);
        // 100 blocks at 0.9: 90 would read as at the redline, so 89.
        assert_eq!(max_admitted_blocks(100, 0.9), 89);
        assert_eq!(max_admitted_blocks(0, 0.9), 0);
    }

    #[test]
    fn a_lone_request_may_take_the_whole_pool() {
        assert!(admits(72, 0, 72, false, 0.9));
        assert!(!admits(72, 1, 64, true, 0.9));
        assert!(admits(72, 1, 63, true, 0.9));
    }

    proptest! {
        #[test]
        fn an_admission_beside_others_stays_under_the_line_and_the_watermark(
            n in 1usize..100_000,
            used in 0usize..100_000,
            need in 0usize..10_000,
            r in 0.01f64..=1.0,
        ) {
            let used = used.min(n);
            if admits(n, used, need, true, r) {
                let after = used + need;
                prop_assert!((after as f64) < n as f64 * r || after == 0);
                prop_assert!(n - after >= watermark_blocks(n));
            }
        }

        #[test]
        fn a_higher_line_admits_at_least_as_much(n in 1usize..100_000, a in 0.01f64..=1.0, b in 0.01f64..=1.0) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(max_admitted_blocks(n, lo) <= max_admitted_blocks(n, hi));
        }
    }
}
