//! Direction reversals, and what the reversal cap costs a policy that knows the future.
//!
//! The targets ask for at most one direction reversal per 10 minutes and for
//! replica-seconds within 1.15x of the oracle, and the oracle itself is not capped: it follows
//! every window's need, up and down. [`cheapest_with_reversals`] finds the cheapest schedule
//! that covers the same per-window needs within a [`Cap`] (so many reversals in all, each so
//! many windows after the last), so the simulator can show the oracle under the cap next to
//! the one without it.

/// The direction of the last change in replicas, and whether the next one reverses it: a
/// change up after a change down, or down after up. The fleet counts its reversals with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Direction(Option<std::cmp::Ordering>);

impl Direction {
    /// Records a change `from` -> `to`; true when it reverses the last change. No change
    /// changes nothing.
    pub fn change(&mut self, from: u32, to: u32) -> bool {
        let dir = to.cmp(&from);
        if dir.is_eq() {
            return false;
        }
        self.0.replace(dir).is_some_and(|last| last != dir)
    }
}

/// Where a schedule (one value per window) may reverse: at most `total` times, and each
/// reversal at least `gap` windows after the one before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    pub total: u32,
    pub gap: usize,
}

impl Cap {
    /// At most one reversal per `period` seconds of a `length`-second schedule of
    /// `window`-second windows: as a rate over the whole, and within any `period`.
    pub fn one_per(period: f64, length: f64, window: f64) -> Self {
        Self {
            total: (length / period).floor() as u32,
            gap: (period / window).ceil() as usize,
        }
    }
}

/// The windows `schedule` reverses direction at (the first window of the new level).
pub fn reversal_windows(schedule: &[u32]) -> Vec<usize> {
    let mut d = Direction::default();
    (1..schedule.len())
        .filter(|&i| d.change(schedule[i - 1], schedule[i]))
        .collect()
}

/// The schedule `s` with `s[i] >= needs[i]` that keeps to `cap` and whose sum is least (ties:
/// the same choice every time). Dynamic programming over (window, level, reversals used,
/// last direction, windows since the last reversal). Levels are every value from the least
/// need to the greatest, not only the needs' own values: under a gap, a step to a level no
/// window needs can start a change of direction early enough to leave room for the next
/// (needs 3,1,1,3,1 with two reversals two windows apart: 3,1,2,3,1 costs 10, the best on the
/// needs' values alone 11).
pub fn cheapest_with_reversals(needs: &[u32], cap: Cap) -> Vec<u32> {
    if needs.is_empty() {
        return Vec::new();
    }
    let lo = *needs.iter().min().expect("not empty");
    let hi = *needs.iter().max().expect("not empty");
    let levels: Vec<u32> = (lo..=hi).collect();
    let nl = levels.len();
    // More reversals than changes of window cannot happen: no need to count past them.
    let nr = (cap.total as usize).min(needs.len()) + 1;
    // Windows since the last reversal, counted up to the gap (also: none yet).
    let ng = cap.gap + 1;
    // Directions: 0 none yet, 1 up, 2 down.
    let idx = |l: usize, r: usize, d: usize, g: usize| ((l * nr + r) * 3 + d) * ng + g;
    let size = nl * nr * 3 * ng;
    const NONE: u64 = u64::MAX;
    let mut cost = vec![NONE; size];
    let mut from: Vec<Vec<usize>> = Vec::with_capacity(needs.len());
    for (l, &v) in levels.iter().enumerate() {
        if v >= needs[0] {
            cost[idx(l, 0, 0, ng - 1)] = v as u64;
        }
    }
    from.push(vec![usize::MAX; size]);
    for &need in &needs[1..] {
        let mut next = vec![NONE; size];
        let mut back = vec![usize::MAX; size];
        for l in 0..nl {
            for r in 0..nr {
                for d in 0..3 {
                    for g in 0..ng {
                        let c = cost[idx(l, r, d, g)];
                        if c == NONE {
                            continue;
                        }
                        for (m, &v) in levels.iter().enumerate().filter(|(_, &v)| v >= need) {
                            let nd = match m.cmp(&l) {
                                std::cmp::Ordering::Equal => d,
                                std::cmp::Ordering::Greater => 1,
                                std::cmp::Ordering::Less => 2,
                            };
                            let reverses = d != 0 && nd != d;
                            let (r2, g2) = if reverses {
                                if r + 1 >= nr || (r > 0 && g + 1 < cap.gap) {
                                    continue;
                                }
                                (r + 1, 0)
                            } else {
                                (r, (g + 1).min(ng - 1))
                            };
                            let j = idx(m, r2, nd, g2);
                            let total = c + v as u64;
                            if total < next[j] {
                                next[j] = total;
                                back[j] = idx(l, r, d, g);
                            }
                        }
                    }
                }
            }
        }
        cost = next;
        from.push(back);
    }
    let mut at = (0..size)
        .filter(|&j| cost[j] != NONE)
        .min_by_key(|&j| (cost[j], j))
        .expect("the highest level alone covers every need with no reversal");
    let mut out = vec![0; needs.len()];
    for i in (0..needs.len()).rev() {
        out[i] = levels[at / (nr * 3 * ng)];
        at = from[i][at];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reversals_count_changes_of_direction_only() {
        let reversals = |s: &[u32]| reversal_windows(s).len();
        assert_eq!(reversals(&[]), 0);
        assert_eq!(reversals(&[2, 2, 3, 3, 5]), 0);
        assert_eq!(reversals(&[2, 5, 5, 2]), 1);
        assert_eq!(reversals(&[2, 3, 2, 5, 2]), 3);
        assert_eq!(reversals(&[5, 4, 2, 2, 4]), 1);
    }

    /// Whether `schedule` keeps to `cap`, counted from its reversals directly.
    fn allows(cap: Cap, schedule: &[u32]) -> bool {
        let r = reversal_windows(schedule);
        r.len() as u64 <= u64::from(cap.total) && r.windows(2).all(|p| p[1] - p[0] >= cap.gap)
    }

    fn total(n: u32) -> Cap {
        Cap { total: n, gap: 0 }
    }

    #[test]
    fn each_reversal_allowed_buys_back_a_valley() {
        let needs = [1, 3, 1, 3, 1];
        let sum = |cap| {
            cheapest_with_reversals(&needs, total(cap))
                .iter()
                .sum::<u32>()
        };
        // Monotone (1,3,3,3,3 or 3,3,3,3,1), one valley filled (1,3,3,3,1), all followed.
        assert_eq!([sum(0), sum(1), sum(2), sum(3)], [13, 11, 11, 9]);
        assert_eq!(
            cheapest_with_reversals(&needs, total(1)),
            vec![1, 3, 3, 3, 1]
        );
        assert_eq!(cheapest_with_reversals(&needs, total(3)), needs.to_vec());
    }

    #[test]
    fn reversals_too_close_together_are_not_allowed() {
        // Two valleys: following both reverses at windows 2 (up), 3 (down) and 4 (up); the
        // first change, down, reverses nothing.
        let needs = [3, 1, 3, 1, 3];
        assert_eq!(reversal_windows(&needs), vec![2, 3, 4]);
        let spaced = |gap| Cap { total: 4, gap };
        assert_eq!(cheapest_with_reversals(&needs, spaced(1)), needs.to_vec());
        // Two windows between reversals: one valley is filled, whichever is cheaper.
        let s = cheapest_with_reversals(&needs, spaced(2));
        assert_eq!((s.iter().sum::<u32>(), reversal_windows(&s).len()), (13, 1));
        let s = cheapest_with_reversals(&[3, 1, 3, 1, 1, 3], spaced(2));
        assert_eq!(s, vec![3, 3, 3, 1, 1, 3]);
        let cap = Cap::one_per(600.0, 3599.0, 60.0);
        assert_eq!((cap.total, cap.gap), (5, 10));
    }

    #[test]
    fn a_level_no_window_needs_can_make_room_for_the_next_reversal() {
        // Following the needs reverses at windows 3 and 4, one apart. Stepping up through 2
        // at window 2 moves the first reversal there, two windows before the next.
        let cap = Cap { total: 2, gap: 2 };
        assert_eq!(
            cheapest_with_reversals(&[3, 1, 1, 3, 1], cap),
            vec![3, 1, 2, 3, 1]
        );
    }

    fn brute_force(needs: &[u32], cap: Cap) -> u64 {
        let top = *needs.iter().max().unwrap();
        let mut best = u64::MAX;
        let mut s: Vec<u32> = needs.to_vec();
        loop {
            if allows(cap, &s) {
                best = best.min(s.iter().map(|&v| v as u64).sum());
            }
            // Next candidate, odometer-style, each digit from needs[i] to top.
            let mut i = 0;
            loop {
                if i == s.len() {
                    return best;
                }
                if s[i] < top {
                    s[i] += 1;
                    break;
                }
                s[i] = needs[i];
                i += 1;
            }
        }
    }

    proptest! {
        #[test]
        fn the_schedule_covers_the_needs_within_the_cap_at_the_least_cost(
            needs in proptest::collection::vec(1u32..6, 1..9),
            total in 0u32..4,
            gap in 0usize..5,
        ) {
            let cap = Cap { total, gap };
            let s = cheapest_with_reversals(&needs, cap);
            prop_assert_eq!(s.len(), needs.len());
            prop_assert!(s.iter().zip(&needs).all(|(a, b)| a >= b), "{:?} {:?}", s, needs);
            prop_assert!(allows(cap, &s), "{:?}", s);
            let sum: u64 = s.iter().map(|&v| v as u64).sum();
            prop_assert_eq!(sum, brute_force(&needs, cap));
            if allows(cap, &needs) {
                prop_assert_eq!(s, needs);
            }
        }
    }
}
