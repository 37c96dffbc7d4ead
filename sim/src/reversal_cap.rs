//! Direction reversals, and what the reversal cap costs a policy that knows the future.
//!
//! The targets ask for at most one direction reversal per 10 minutes and for
//! replica-seconds within 1.15x of the oracle, and the oracle itself is not capped: it follows
//! every window's need, up and down. [`cheapest_with_reversals`] finds the cheapest schedule
//! that covers the same per-window needs with at most a given number of reversals, so the
//! simulator can show the oracle under the cap next to the one without it.

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

/// Direction reversals in a schedule, counted as the fleet counts them.
pub fn reversals(schedule: &[u32]) -> u32 {
    let mut d = Direction::default();
    schedule
        .windows(2)
        .map(|w| u32::from(d.change(w[0], w[1])))
        .sum()
}

/// The schedule `s` with `s[i] >= needs[i]` and at most `cap` reversals whose sum is least
/// (ties: the same choice every time). Dynamic programming over (window, level,
/// reversals used, last direction); levels are the needs' own values, since any optimal
/// plateau can be lowered to the largest need it covers.
pub fn cheapest_with_reversals(needs: &[u32], cap: u32) -> Vec<u32> {
    if needs.is_empty() {
        return Vec::new();
    }
    let mut levels: Vec<u32> = needs.to_vec();
    levels.sort_unstable();
    levels.dedup();
    let (nl, nr) = (levels.len(), cap as usize + 1);
    // Directions: 0 none yet, 1 up, 2 down.
    let idx = |l: usize, r: usize, d: usize| (l * nr + r) * 3 + d;
    let size = nl * nr * 3;
    const NONE: u64 = u64::MAX;
    let mut cost = vec![NONE; size];
    let mut from: Vec<Vec<usize>> = Vec::with_capacity(needs.len());
    for (l, &v) in levels.iter().enumerate() {
        if v >= needs[0] {
            cost[idx(l, 0, 0)] = v as u64;
        }
    }
    from.push(vec![usize::MAX; size]);
    for &need in &needs[1..] {
        let mut next = vec![NONE; size];
        let mut back = vec![usize::MAX; size];
        for l in 0..nl {
            for r in 0..nr {
                for d in 0..3 {
                    let c = cost[idx(l, r, d)];
                    if c == NONE {
                        continue;
                    }
                    for (m, &v) in levels.iter().enumerate().filter(|(_, &v)| v >= need) {
                        let (nd, nr2) = match m.cmp(&l) {
                            std::cmp::Ordering::Equal => (d, r),
                            std::cmp::Ordering::Greater => (1, r + usize::from(d == 2)),
                            std::cmp::Ordering::Less => (2, r + usize::from(d == 1)),
                        };
                        if nr2 >= nr {
                            continue;
                        }
                        let j = idx(m, nr2, nd);
                        let total = c + v as u64;
                        if total < next[j] {
                            next[j] = total;
                            back[j] = idx(l, r, d);
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
        out[i] = levels[at / (nr * 3)];
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
        assert_eq!(reversals(&[]), 0);
        assert_eq!(reversals(&[2, 2, 3, 3, 5]), 0);
        assert_eq!(reversals(&[2, 5, 5, 2]), 1);
        assert_eq!(reversals(&[2, 3, 2, 5, 2]), 3);
        assert_eq!(reversals(&[5, 4, 2, 2, 4]), 1);
    }

    #[test]
    fn each_reversal_allowed_buys_back_a_valley() {
        let needs = [1, 3, 1, 3, 1];
        let sum = |cap| cheapest_with_reversals(&needs, cap).iter().sum::<u32>();
        // Monotone (1,3,3,3,3 or 3,3,3,3,1), one valley filled (1,3,3,3,1), all followed.
        assert_eq!([sum(0), sum(1), sum(2), sum(3)], [13, 11, 11, 9]);
        assert_eq!(cheapest_with_reversals(&needs, 1), vec![1, 3, 3, 3, 1]);
        assert_eq!(cheapest_with_reversals(&needs, 3), needs.to_vec());
    }

    fn brute_force(needs: &[u32], cap: u32) -> u64 {
        let top = *needs.iter().max().unwrap();
        let mut best = u64::MAX;
        let mut s: Vec<u32> = needs.to_vec();
        loop {
            if reversals(&s) <= cap {
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
            needs in proptest::collection::vec(1u32..5, 1..7),
            cap in 0u32..4,
        ) {
            let s = cheapest_with_reversals(&needs, cap);
            prop_assert_eq!(s.len(), needs.len());
            prop_assert!(s.iter().zip(&needs).all(|(a, b)| a >= b), "{:?} {:?}", s, needs);
            prop_assert!(reversals(&s) <= cap, "{:?}", s);
            let sum: u64 = s.iter().map(|&v| v as u64).sum();
            prop_assert_eq!(sum, brute_force(&needs, cap));
            if reversals(&needs) <= cap {
                prop_assert_eq!(s, needs);
            }
        }
    }
}
