//! Per-sequence block tables on top of the block pool.
//!
//! The narrow interface the scheduler needs: how many prompt tokens are already cached,
//! "give this sequence room for n more tokens" (which answers `false` when the pool is short,
//! so the caller preempts someone), "these tokens are now computed" (full blocks become
//! shareable prefixes), fork, and free. No I/O; the KV data is elsewhere.

use crate::block_pool::{BlockHash, BlockId, BlockPool};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

pub type SeqId = u64;

#[derive(Debug, Default, Clone)]
struct Table {
    blocks: Vec<BlockId>,
    /// Hashes of the leading full blocks already registered in the prefix cache.
    hashes: Vec<BlockHash>,
}

/// A KV copy the model runner must perform before the next step (copy-on-fork of a partly
/// filled block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    pub src: BlockId,
    pub dst: BlockId,
}

#[derive(Debug)]
pub struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
    tables: HashMap<SeqId, Table>,
}

/// Content hash of one full block, chained to its parent so equal blocks at different
/// positions or after different prefixes never collide by construction.
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl KvCacheManager {
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        assert!(block_size > 0);
        Self {
            pool: BlockPool::new(num_blocks, prefix_caching),
            block_size,
            tables: HashMap::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }
    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free()
    }
    pub fn num_used_blocks(&self) -> usize {
        self.pool.num_used()
    }
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks() * self.block_size
    }

    pub fn block_table(&self, seq: SeqId) -> &[BlockId] {
        self.tables.get(&seq).map_or(&[], |t| &t.blocks)
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// For a sequence with no blocks yet: takes the longest cached prefix of `tokens` in whole
    /// blocks and returns how many tokens it covers. At least one token is always left to
    /// compute, because the step that computes it produces the logits we sample from.
    pub fn attach_cached_prefix(&mut self, seq: SeqId, tokens: &[u32]) -> usize {
        let table = self.tables.entry(seq).or_default();
        assert!(
            table.blocks.is_empty(),
            "prefix attach on a sequence with blocks"
        );
        if !self.pool.prefix_caching() || tokens.len() < 2 {
            return 0;
        }
        let max_blocks = (tokens.len() - 1) / self.block_size;
        let mut parent = None;
        for chunk in tokens.chunks(self.block_size).take(max_blocks) {
            let h = block_hash(parent, chunk);
            match self.pool.lookup(h) {
                Some(id) => {
                    self.pool.share(id);
                    table.blocks.push(id);
                    table.hashes.push(h);
                    parent = Some(h);
                }
                None => break,
            }
        }
        table.blocks.len() * self.block_size
    }

    /// Makes room for the sequence to hold `total_tokens` tokens of KV. All or nothing: on
    /// `false` nothing changed and the caller must free someone's blocks or wait.
    pub fn allocate(&mut self, seq: SeqId, total_tokens: usize) -> bool {
        let have = self.tables.get(&seq).map_or(0, |t| t.blocks.len());
        let need = self.blocks_for(total_tokens).saturating_sub(have);
        if need > self.pool.num_free() {
            return false;
        }
        let table = self.tables.entry(seq).or_default();
        for _ in 0..need {
            let id = self
                .pool
                .allocate()
                .expect("free count said there was room");
            table.blocks.push(id);
        }
        true
    }

    /// Registers every full block among the first `computed` tokens in the prefix cache.
    pub fn cache_computed(&mut self, seq: SeqId, tokens: &[u32], computed: usize) {
        if !self.pool.prefix_caching() {
            return;
        }
        let Some(table) = self.tables.get_mut(&seq) else {
            return;
        };
        let full = (computed / self.block_size).min(table.blocks.len());
        while table.hashes.len() < full {
            let i = table.hashes.len();
            let parent = table.hashes.last().copied();
            let h = block_hash(
                parent,
                &tokens[i * self.block_size..(i + 1) * self.block_size],
            );
            self.pool.register(table.blocks[i], h);
            table.hashes.push(h);
        }
    }

    /// Gives `child` the parent's KV for its first `tokens` tokens. Full blocks are shared;
    /// a trailing partial block is copied into a fresh block (returned as a copy to perform),
    /// because both sequences will append to it. `None` if no block is free for the copy.
    pub fn fork(
        &mut self,
        parent: SeqId,
        child: SeqId,
        tokens: usize,
    ) -> Option<Option<BlockCopy>> {
        assert!(
            !self.tables.contains_key(&child),
            "fork into existing sequence"
        );
        let src = self.tables.get(&parent).cloned().unwrap_or_default();
        let full = tokens / self.block_size;
        let partial = !tokens.is_multiple_of(self.block_size);
        assert!(
            self.blocks_for(tokens) <= src.blocks.len(),
            "fork past parent's KV"
        );
        let copy = if partial {
            let dst = self.pool.allocate()?;
            Some(BlockCopy {
                src: src.blocks[full],
                dst,
            })
        } else {
            None
        };
        let mut table = Table {
            blocks: src.blocks[..full].to_vec(),
            hashes: src.hashes.iter().copied().take(full).collect(),
        };
        for &b in &table.blocks {
            self.pool.share(b);
        }
        if let Some(c) = copy {
            table.blocks.push(c.dst);
        }
        self.tables.insert(child, table);
        Some(copy)
    }

    /// Releases all of a sequence's blocks, last block first, so that when they are evicted
    /// later the tail of a prefix goes before its head.
    pub fn free(&mut self, seq: SeqId) {
        if let Some(t) = self.tables.remove(&seq) {
            for &b in t.blocks.iter().rev() {
                self.pool.free(b);
            }
        }
    }

    pub fn contains(&self, seq: SeqId) -> bool {
        self.tables.contains_key(&seq)
    }

    /// Panics unless every block's reference count equals the number of tables holding it.
    pub fn check_invariants(&self) {
        self.pool.check_invariants();
        let mut refs = vec![0u32; self.pool.num_blocks()];
        for t in self.tables.values() {
            for &b in &t.blocks {
                refs[b as usize] += 1;
            }
            assert!(t.hashes.len() <= t.blocks.len());
        }
        for (b, r) in refs.iter().enumerate() {
            assert_eq!(
                *r,
                self.pool.ref_count(b as BlockId),
                "block {b}: owners and ref count disagree"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefix_is_shared_between_sequences() {
        let mut m = KvCacheManager::new(8, 4, true);
        let prompt: Vec<u32> = (0..10).collect();
        assert_eq!(m.attach_cached_prefix(1, &prompt), 0);
        assert!(m.allocate(1, 10));
        m.cache_computed(1, &prompt, 10);
        // Two full blocks (8 tokens) are cached; the second sequence reuses them.
        assert_eq!(m.attach_cached_prefix(2, &prompt), 8);
        assert_eq!(m.block_table(2), &m.block_table(1)[..2]);
        assert!(m.allocate(2, 11));
        m.check_invariants();
        m.free(1);
        m.free(2);
        m.check_invariants();
        assert_eq!(m.num_free_blocks(), 8);
    }

    #[test]
    fn a_prompt_that_is_all_cached_still_computes_its_last_token() {
        let mut m = KvCacheManager::new(8, 4, true);
        let prompt: Vec<u32> = (0..8).collect();
        m.attach_cached_prefix(1, &prompt);
        assert!(m.allocate(1, 8));
        m.cache_computed(1, &prompt, 8);
        assert_eq!(m.attach_cached_prefix(2, &prompt), 4);
    }

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut m = KvCacheManager::new(2, 4, false);
        assert!(m.allocate(1, 5));
        assert!(!m.allocate(2, 5));
        assert_eq!(m.block_table(2).len(), 0);
        m.check_invariants();
    }

    #[test]
    fn fork_copies_the_partial_block() {
        let mut m = KvCacheManager::new(8, 4, true);
        assert!(m.allocate(1, 6));
        let copy = m.fork(1, 2, 6).unwrap().unwrap();
        assert_eq!(copy.src, m.block_table(1)[1]);
        assert_eq!(m.block_table(2)[0], m.block_table(1)[0]);
        assert_ne!(m.block_table(2)[1], m.block_table(1)[1]);
        m.check_invariants();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Start(u8, u8),
        Grow(u8, u8),
        Compute(u8),
        Fork(u8),
        Free(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u8>(), 1u8..40).prop_map(|(s, n)| Op::Start(s, n)),
            (any::<u8>(), 1u8..20).prop_map(|(s, n)| Op::Grow(s, n)),
            any::<u8>().prop_map(Op::Compute),
            any::<u8>().prop_map(Op::Fork),
            any::<u8>().prop_map(Op::Free),
        ]
    }

    proptest! {
        /// No block leaked or owned twice after any sequence of allocate / append / fork /
        /// free / preempt (a preemption is a free followed by a fresh start).
        #[test]
        fn blocks_are_never_leaked_or_double_owned(ops in proptest::collection::vec(op(), 1..200),
                                                   caching in any::<bool>()) {
            let mut m = KvCacheManager::new(16, 4, caching);
            // Live sequences: id -> (tokens, tokens with KV allocated).
            let mut live: Vec<(SeqId, Vec<u32>, usize)> = Vec::new();
            let mut next_id = 0;
            for op in ops {
                match op {
                    Op::Start(seed, n) => {
                        // Few distinct prompts, so prefixes really get shared.
                        let tokens: Vec<u32> = (0..n as u32).map(|i| (i + (seed % 3) as u32 * 100) % 7).collect();
                        next_id += 1;
                        let cached = m.attach_cached_prefix(next_id, &tokens);
                        prop_assert!(cached < tokens.len().max(1));
                        prop_assert_eq!(cached % 4, 0);
                        if m.allocate(next_id, tokens.len()) {
                            live.push((next_id, tokens, n as usize));
                        } else {
                            m.free(next_id); // give back the shared prefix: the "preempt" path
                        }
                    }
                    Op::Grow(i, n) if !live.is_empty() => {
                        let k = i as usize % live.len();
                        let (id, toks, alloc) = &mut live[k];
                        let want = toks.len() + n as usize;
                        if m.allocate(*id, want) {
                            toks.extend((0..n as u32).map(|x| x % 5));
                            *alloc = want;
                        } else {
                            // Preempt by recompute: free everything, forget progress.
                            m.free(*id);
                            live.remove(k);
                        }
                    }
                    Op::Compute(i) if !live.is_empty() => {
                        let (id, toks, alloc) = &live[i as usize % live.len()];
                        m.cache_computed(*id, toks, *alloc);
                    }
                    Op::Fork(i) if !live.is_empty() => {
                        let (id, toks, alloc) = live[i as usize % live.len()].clone();
                        next_id += 1;
                        if let Some(_copy) = m.fork(id, next_id, alloc) {
                            live.push((next_id, toks, alloc));
                        }
                    }
                    Op::Free(i) if !live.is_empty() => {
                        let (id, _, _) = live.remove(i as usize % live.len());
                        m.free(id);
                    }
                    _ => {}
                }
                m.check_invariants();
                for (id, _, alloc) in &live {
                    prop_assert!(m.block_table(*id).len() * 4 >= *alloc);
                }
            }
            for (id, _, _) in live.drain(..) {
                m.free(id);
            }
            m.check_invariants();
            prop_assert_eq!(m.num_free_blocks(), 16);
        }
    }
}
