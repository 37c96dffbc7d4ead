//! How much of its KV pool an engine keeps free when it admits a request while others run:
//! admitting into the last blocks would only push a running sequence into preemption a step
//! later (vLLM v0's block manager keeps the same 1%). A lone request may take the whole pool.
//! The engine's scheduler and the simulator's engine model both use this.

/// Blocks to leave free at admission in a pool of `num_blocks`: 1%, at least one.
pub fn watermark_blocks(num_blocks: usize) -> usize {
    (num_blocks / 100).max(1).min(num_blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_percent_at_least_one_never_more_than_the_pool() {
        assert_eq!(watermark_blocks(0), 0);
        assert_eq!(watermark_blocks(6), 1);
        assert_eq!(watermark_blocks(100), 1);
        assert_eq!(watermark_blocks(26_624), 266);
    }
}
