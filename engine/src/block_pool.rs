//! The KV block pool: fixed-size blocks, reference counts, an O(1) free list, and a prefix
//! cache of full blocks keyed by content hash.
//!
//! Freed blocks that hold a cached prefix stay cached while they sit in the free list, so a
//! later request with the same prefix can revive them. Allocation takes the least recently
//! freed block (the head of the list) and evicts its cache entry; that is the whole eviction
//! policy, as in vLLM v1's block pool. The free list is intrusive and doubly linked so reviving
//! a cached block from the middle of the list is O(1) too.
//!
//! No I/O and no tensors: the pool only hands out block ids. The KV data itself lives in
//! `paged_attention::KvStore`, indexed by these ids.

use std::collections::HashMap;

pub type BlockId = u32;
/// Hash of a full block's tokens chained with its parent block's hash.
pub type BlockHash = u64;

const NIL: u32 = u32::MAX;

#[derive(Debug)]
pub struct BlockPool {
    ref_cnt: Vec<u32>,
    hash: Vec<Option<BlockHash>>,
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    num_free: usize,
    cached: HashMap<BlockHash, BlockId>,
    prefix_caching: bool,
}

impl BlockPool {
    pub fn new(num_blocks: usize, prefix_caching: bool) -> Self {
        assert!(num_blocks < NIL as usize, "too many blocks");
        let n = num_blocks as u32;
        let prev = (0..n).map(|i| if i == 0 { NIL } else { i - 1 }).collect();
        let next = (0..n)
            .map(|i| if i + 1 == n { NIL } else { i + 1 })
            .collect();
        Self {
            ref_cnt: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            prev,
            next,
            head: if n == 0 { NIL } else { 0 },
            tail: if n == 0 { NIL } else { n - 1 },
            num_free: num_blocks,
            cached: HashMap::new(),
            prefix_caching,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_cnt.len()
    }

    /// Blocks that can be allocated now (free, including cached blocks nobody references).
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free
    }

    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.ref_cnt[id as usize]
    }

    /// Takes the least recently freed block, evicting whatever prefix it cached.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = self.head;
        if id == NIL {
            return None;
        }
        self.unlink(id);
        if let Some(h) = self.hash[id as usize].take() {
            if self.cached.get(&h) == Some(&id) {
                self.cached.remove(&h);
            }
        }
        self.ref_cnt[id as usize] = 1;
        Some(id)
    }

    /// Drops one reference; at zero the block joins the tail of the free list, still cached.
    pub fn free(&mut self, id: BlockId) {
        let rc = &mut self.ref_cnt[id as usize];
        assert!(*rc > 0, "double free of block {id}");
        *rc -= 1;
        if *rc == 0 {
            self.push_tail(id);
        }
    }

    /// Adds a reference to a block someone already holds or that sits cached in the free list.
    pub fn share(&mut self, id: BlockId) {
        if self.ref_cnt[id as usize] == 0 {
            self.unlink(id);
        }
        self.ref_cnt[id as usize] += 1;
    }

    /// The cached block holding this prefix hash, if any (referenced or free).
    pub fn lookup(&self, hash: BlockHash) -> Option<BlockId> {
        if !self.prefix_caching {
            return None;
        }
        self.cached.get(&hash).copied()
    }

    /// Records that a full, referenced block holds the prefix `hash`. A prefix already cached
    /// in another block keeps that block: the duplicate simply stays uncached.
    pub fn register(&mut self, id: BlockId, hash: BlockHash) {
        if !self.prefix_caching || self.hash[id as usize].is_some() {
            return;
        }
        debug_assert!(self.ref_cnt[id as usize] > 0);
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
            e.insert(id);
            self.hash[id as usize] = Some(hash);
        }
    }

    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    fn unlink(&mut self, id: BlockId) {
        let (p, n) = (self.prev[id as usize], self.next[id as usize]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[id as usize] = NIL;
        self.next[id as usize] = NIL;
        self.num_free -= 1;
    }

    fn push_tail(&mut self, id: BlockId) {
        self.prev[id as usize] = self.tail;
        self.next[id as usize] = NIL;
        if self.tail == NIL {
            self.head = id;
        } else {
            self.next[self.tail as usize] = id;
        }
        self.tail = id;
        self.num_free += 1;
    }

    /// Panics unless the free list holds exactly the unreferenced blocks, each once, and the
    /// prefix cache points only at blocks that carry that hash.
    pub fn check_invariants(&self) {
        let mut seen = vec![false; self.num_blocks()];
        let mut count = 0;
        let mut cur = self.head;
        let mut prev = NIL;
        while cur != NIL {
            assert!(!seen[cur as usize], "block {cur} twice in free list");
            seen[cur as usize] = true;
            assert_eq!(self.prev[cur as usize], prev, "broken back link at {cur}");
            assert_eq!(
                self.ref_cnt[cur as usize], 0,
                "referenced block {cur} in free list"
            );
            count += 1;
            prev = cur;
            cur = self.next[cur as usize];
        }
        assert_eq!(prev, self.tail, "tail mismatch");
        assert_eq!(count, self.num_free, "free count mismatch");
        for (i, rc) in self.ref_cnt.iter().enumerate() {
            assert!(
                *rc > 0 || seen[i],
                "block {i} unreferenced but not free (leaked)"
            );
        }
        for (h, id) in &self.cached {
            assert_eq!(self.hash[*id as usize], Some(*h), "cache entry mismatch");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_in_order_and_reuses_freed_last() {
        let mut p = BlockPool::new(3, true);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        assert_eq!((a, b), (0, 1));
        p.free(a);
        // 2 was never used, so it is older in the free list than the just-freed 0.
        assert_eq!(p.allocate(), Some(2));
        assert_eq!(p.allocate(), Some(0));
        assert_eq!(p.allocate(), None);
        p.check_invariants();
    }

    #[test]
    fn cached_block_is_revived_until_evicted() {
        let mut p = BlockPool::new(2, true);
        let a = p.allocate().unwrap();
        p.register(a, 42);
        p.free(a);
        assert_eq!(p.lookup(42), Some(a));
        p.share(a);
        assert_eq!(p.ref_count(a), 1);
        assert_eq!(p.num_free(), 1);
        p.free(a);
        // Allocating both blocks evicts the cached prefix.
        let x = p.allocate().unwrap();
        let y = p.allocate().unwrap();
        assert_ne!(x, y);
        assert_eq!(p.lookup(42), None);
        p.check_invariants();
    }

    #[test]
    fn disabled_prefix_caching_never_hits() {
        let mut p = BlockPool::new(2, false);
        let a = p.allocate().unwrap();
        p.register(a, 7);
        assert_eq!(p.lookup(7), None);
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_panics() {
        let mut p = BlockPool::new(1, false);
        let a = p.allocate().unwrap();
        p.free(a);
        p.free(a);
    }
}
