//! Paged attention on CPU: the KV cache lives in fixed-size blocks, and each sequence's keys
//! and values are found through its block table, so sequences of any length share one pool
//! without copying or fragmentation.
//!
//! Layout per layer: `[block][slot in block][kv head][head dim]`, f32. A token at position
//! `p` of a sequence lives in block `table[p / block_size]`, slot `p % block_size`.
//! Work is split across (query token, KV head) pairs on the rayon pool, each serving the query
//! heads that share that KV head, so every key and value row is read once per group.

use rayon::prelude::*;

/// Steps with fewer (query head, key) pairs than this attend on one thread.
const SERIAL_KEYS: usize = 16 * 1024;

pub struct KvStore {
    num_layers: usize,
    num_blocks: usize,
    block_size: usize,
    n_kv_heads: usize,
    head_dim: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// Where one query token attends: its own position and its sequence's block table.
#[derive(Debug, Clone, Copy)]
pub struct TokenCtx<'a> {
    pub pos: usize,
    pub table: &'a [u32],
}

impl KvStore {
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        let per_layer = num_blocks * block_size * n_kv_heads * head_dim;
        Self {
            num_layers,
            num_blocks,
            block_size,
            n_kv_heads,
            head_dim,
            k: (0..num_layers).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..num_layers).map(|_| vec![0.0; per_layer]).collect(),
        }
    }

    /// Bytes of KV one token costs across all layers (keys and values, f32).
    pub fn bytes_per_token(num_layers: usize, n_kv_heads: usize, head_dim: usize) -> usize {
        2 * num_layers * n_kv_heads * head_dim * std::mem::size_of::<f32>()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn row(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    fn slot_offset(&self, table: &[u32], pos: usize) -> usize {
        let block = table[pos / self.block_size] as usize;
        (block * self.block_size + pos % self.block_size) * self.row()
    }

    /// Stores the keys and values of a token (all kv heads, rows of `n_kv_heads * head_dim`).
    pub fn write(&mut self, layer: usize, ctx: TokenCtx, k: &[f32], v: &[f32]) {
        let row = self.row();
        let off = self.slot_offset(ctx.table, ctx.pos);
        self.k[layer][off..off + row].copy_from_slice(k);
        self.v[layer][off..off + row].copy_from_slice(v);
    }

    /// Copies a whole block in every layer (copy-on-fork).
    pub fn copy_block(&mut self, src: u32, dst: u32) {
        let n = self.block_size * self.row();
        let (s, d) = (src as usize * n, dst as usize * n);
        for l in 0..self.num_layers {
            self.k[l].copy_within(s..s + n, d);
            self.v[l].copy_within(s..s + n, d);
        }
    }

    /// Causal attention for a batch of query tokens: `q` is `[tokens, n_heads, head_dim]`,
    /// the result has the same shape. Token `t` attends to positions `0..=ctx[t].pos` of its
    /// own sequence, whose KV (its own included) must already be written.
    pub fn attention(&self, layer: usize, q: &[f32], ctx: &[TokenCtx], n_heads: usize) -> Vec<f32> {
        let hd = self.head_dim;
        let group = n_heads / self.n_kv_heads;
        // Query heads that share a KV head are served together, so each key and value row is
        // read once for all of them (in groups of at most MAX_GROUP).
        let per_item = (1..=group.min(MAX_GROUP))
            .rev()
            .find(|g| group.is_multiple_of(*g))
            .unwrap_or(1);
        let items_per_token = n_heads / per_item;
        let scale = 1.0 / (hd as f32).sqrt();
        let (kc, vc) = (&self.k[layer], &self.v[layer]);
        let mut out = vec![0.0f32; q.len()];
        let avx2 = crate::cpu::has_avx2_fma();
        let one = |(i, o): (usize, &mut [f32])| {
            let (t, first) = (i / items_per_token, (i % items_per_token) * per_item);
            let heads = Heads {
                q: &q[(t * n_heads + first) * hd..(t * n_heads + first + per_item) * hd],
                kv_offset: (first / group) * hd,
                scale,
            };
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: AVX2 and FMA were detected at run time.
                return unsafe { self.attend_avx2(heads, ctx[t], kc, vc, o) };
            }
            let _ = avx2;
            self.attend(heads, ctx[t], kc, vc, o)
        };
        // A small step (one decode token over a short context: tens of microseconds) runs on
        // the calling thread; waking the pool would cost about as much as the work.
        let keys: usize = ctx.iter().map(|c| c.pos + 1).sum::<usize>() * n_heads;
        if keys < SERIAL_KEYS {
            out.chunks_mut(per_item * hd).enumerate().for_each(one);
        } else {
            out.par_chunks_mut(per_item * hd).enumerate().for_each(one);
        }
        out
    }

    /// The same code compiled for AVX2: 8-wide instead of SSE2's 4-wide vectors.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn attend_avx2(&self, h: Heads, c: TokenCtx, kc: &[f32], vc: &[f32], o: &mut [f32]) {
        self.attend(h, c, kc, vc, o)
    }

    /// Query heads of one token (sharing one KV head) over its sequence's keys `0..=c.pos`.
    /// Each head gets exactly the operations it would get alone.
    #[inline(always)]
    fn attend(&self, h: Heads, c: TokenCtx, kc: &[f32], vc: &[f32], o: &mut [f32]) {
        let hd = self.head_dim;
        // Online softmax over chunks of keys: scores of a chunk first, then one max, one
        // rescale and one vectorized exp per head and chunk (a libm exp per key cost as much
        // as the key's dot product and value update together).
        let mut max = [f32::NEG_INFINITY; MAX_GROUP];
        let mut denom = [0.0f32; MAX_GROUP];
        let (mut w, mut offs) = ([[0.0f32; CHUNK]; MAX_GROUP], [0usize; CHUNK]);
        let n = c.pos + 1;
        for start in (0..n).step_by(CHUNK) {
            let len = CHUNK.min(n - start);
            for j in 0..len {
                let off = self.slot_offset(c.table, start + j) + h.kv_offset;
                offs[j] = off;
                let k = &kc[off..off + hd];
                for (g, q) in h.q.chunks_exact(hd).enumerate() {
                    w[g][j] = dot(q, k) * h.scale;
                }
            }
            for (g, og) in o.chunks_exact_mut(hd).enumerate() {
                let w = &mut w[g][..len];
                let chunk_max = w.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                if chunk_max > max[g] {
                    let r = (max[g] - chunk_max).exp();
                    denom[g] *= r;
                    og.iter_mut().for_each(|x| *x *= r);
                    max[g] = chunk_max;
                }
                w.iter_mut().for_each(|s| *s -= max[g]);
                crate::exp::exp_in_place(w);
            }
            for (j, &off) in offs[..len].iter().enumerate() {
                let v = &vc[off..off + hd];
                for (g, og) in o.chunks_exact_mut(hd).enumerate() {
                    denom[g] += w[g][j];
                    axpy(w[g][j], v, og);
                }
            }
        }
        for (g, og) in o.chunks_exact_mut(hd).enumerate() {
            let inv = 1.0 / denom[g];
            og.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// At most this many query heads share one work item (Llama 3 70B groups 8).
const MAX_GROUP: usize = 8;

/// Keys scored together before their softmax weights are taken.
const CHUNK: usize = 16;

/// Query heads sharing a KV head: their vectors (`[heads, head_dim]`), where that KV head sits
/// in a cache row, the score scale.
#[derive(Clone, Copy)]
struct Heads<'a> {
    q: &'a [f32],
    kv_offset: usize,
    scale: f32,
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators so the compiler vectorizes without reassociation.
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn axpy(w: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += w * xi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain contiguous attention as the oracle.
    fn naive(q: &[f32], ks: &[Vec<f32>], vs: &[Vec<f32>], hd: usize) -> Vec<f32> {
        let scale = 1.0 / (hd as f32).sqrt();
        let s: Vec<f32> = ks.iter().map(|k| dot(q, k) * scale).collect();
        let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f32 = e.iter().sum();
        (0..hd)
            .map(|d| e.iter().zip(vs).map(|(w, v)| w * v[d]).sum::<f32>() / z)
            .collect()
    }

    #[test]
    fn paged_matches_contiguous_with_scattered_blocks_and_gqa() {
        // Groups of 3 query heads per KV head (as SmolLM2), 40 positions: several chunks.
        let (bs, hd, n_kv, n_heads) = (4, 8, 2, 6);
        let mut store = KvStore::new(1, 16, bs, n_kv, hd);
        let table = [5u32, 2, 7, 12, 0, 9, 15, 3, 11, 1]; // deliberately out of order
        let len = 40;
        let val = |p: usize, i: usize, salt: f32| ((p * 31 + i * 7) as f32 * 0.37 + salt).sin();
        let mut ks = vec![vec![]; n_kv];
        let mut vs = vec![vec![]; n_kv];
        for p in 0..len {
            let k: Vec<f32> = (0..n_kv * hd).map(|i| val(p, i, 0.1)).collect();
            let v: Vec<f32> = (0..n_kv * hd).map(|i| val(p, i, 0.9)).collect();
            store.write(
                0,
                TokenCtx {
                    pos: p,
                    table: &table,
                },
                &k,
                &v,
            );
            for h in 0..n_kv {
                ks[h].push(k[h * hd..(h + 1) * hd].to_vec());
                vs[h].push(v[h * hd..(h + 1) * hd].to_vec());
            }
        }
        // Query tokens of the same sequence inside, at and across chunk boundaries; large
        // enough scores that the running maximum moves between chunks.
        let ctx = [6, 10, 15, 16, 39].map(|pos| TokenCtx { pos, table: &table });
        let q: Vec<f32> = (0..ctx.len() * n_heads * hd)
            .map(|i| 4.0 * (i as f32 * 0.13).cos())
            .collect();
        let out = store.attention(0, &q, &ctx, n_heads);
        for (t, c) in ctx.iter().enumerate() {
            for h in 0..n_heads {
                let kvh = h / (n_heads / n_kv);
                let qi = &q[(t * n_heads + h) * hd..][..hd];
                let want = naive(qi, &ks[kvh][..=c.pos], &vs[kvh][..=c.pos], hd);
                let got = &out[(t * n_heads + h) * hd..][..hd];
                for (a, b) in want.iter().zip(got) {
                    assert!((a - b).abs() < 1e-5, "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn copy_block_duplicates_every_layer() {
        let mut s = KvStore::new(2, 2, 2, 1, 2);
        for l in 0..2 {
            s.write(
                l,
                TokenCtx {
                    pos: 1,
                    table: &[0],
                },
                &[1.0, 2.0],
                &[3.0, 4.0],
            );
        }
        s.copy_block(0, 1);
        let q = [1.0, 0.0];
        for l in 0..2 {
            let out = s.attention(
                l,
                &q,
                &[TokenCtx {
                    pos: 1,
                    table: &[1],
                }],
                1,
            );
            // Slot 0 of block 1 is zeros, slot 1 is the copied (3, 4).
            assert!(out[0] > 1.5 && out[1] > 2.0, "{out:?}");
        }
    }
}
