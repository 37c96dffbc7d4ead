//! Paged attention on CPU: the KV cache lives in fixed-size blocks, and each sequence's keys
//! and values are found through its block table, so sequences of any length share one pool
//! without copying or fragmentation.
//!
//! Layout per layer: `[block][kv head][...]`, so one KV head's share of a block is one
//! contiguous region. Keys are stored transposed in it, `[head dim][slot]`: a query scores a
//! block's keys with the keys as vector lanes, one FMA per dimension and no horizontal sums
//! (the per-key dot products were a fifth of the engine's time at 32 streams). Values are rows,
//! `[slot][head dim]`. The pool holds f16 by default: decode attention over many streams reads
//! the whole cache every step and is bound by memory, so half the bytes is nearly half the
//! time, and a pod holds twice the tokens (llama.cpp and vLLM keep f16 too). f32 stays for
//! the reference test, where any difference must be summation order.
//!
//! Work is split across (query token, KV head) pairs on the rayon pool, each serving the query
//! heads that share that KV head, so every key and value is read once per group.

use half::f16;
use rayon::prelude::*;

/// Steps with fewer (query head, key) pairs than this attend on one thread.
const SERIAL_KEYS: usize = 16 * 1024;

/// At most this many query heads share one work item (Llama 3 70B groups 8).
const MAX_GROUP: usize = 8;

/// The largest block size: a work item keeps one block's scores per head on its stack.
pub const MAX_BLOCK_SIZE: usize = 256;

/// What the KV pool stores per element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// Half precision (as llama.cpp and vLLM): half the memory and the traffic.
    #[default]
    F16,
    /// Single precision, exactly what the model computed.
    F32,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }
}

/// An element of the pool. `Default` is zero, so `vec![E::default(); n]` is a zeroed
/// allocation: the pool's pages are only touched (and counted in RSS) as blocks are used.
trait Elem: Copy + Default + Send + Sync {
    const IS_F16: bool;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Elem for f32 {
    const IS_F16: bool = false;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

/// f16, kept as its bits: std's zeroed allocation applies to `u16`, not to `half::f16`.
impl Elem for u16 {
    const IS_F16: bool = true;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x).to_bits()
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::from_bits(self).to_f32()
    }
}

#[derive(Debug, Clone, Copy)]
struct Shape {
    num_layers: usize,
    num_blocks: usize,
    block_size: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Shape {
    /// Elements of one KV head's share of one block.
    fn region(&self) -> usize {
        self.block_size * self.head_dim
    }
    /// Elements of one block, all KV heads.
    fn block(&self) -> usize {
        self.n_kv_heads * self.region()
    }
    /// Where `kv_head`'s region of `block` starts in a layer.
    fn base(&self, block: u32, kv_head: usize) -> usize {
        (block as usize * self.n_kv_heads + kv_head) * self.region()
    }
}

/// Per layer, keys and values.
struct Layers<E> {
    k: Vec<Vec<E>>,
    v: Vec<Vec<E>>,
}

impl<E: Elem> Layers<E> {
    fn new(s: &Shape) -> Self {
        let per_layer = s.num_blocks * s.block();
        Self {
            k: (0..s.num_layers)
                .map(|_| vec![E::default(); per_layer])
                .collect(),
            v: (0..s.num_layers)
                .map(|_| vec![E::default(); per_layer])
                .collect(),
        }
    }

    fn write(&mut self, s: &Shape, layer: usize, ctx: TokenCtx, k: &[f32], v: &[f32]) {
        let (bs, hd) = (s.block_size, s.head_dim);
        let (block, slot) = (ctx.table[ctx.pos / bs], ctx.pos % bs);
        let (kl, vl) = (&mut self.k[layer], &mut self.v[layer]);
        for h in 0..s.n_kv_heads {
            let base = s.base(block, h);
            let (kh, vh) = (&k[h * hd..][..hd], &v[h * hd..][..hd]);
            for (d, &x) in kh.iter().enumerate() {
                kl[base + d * bs + slot] = E::from_f32(x);
            }
            for (dst, &x) in vl[base + slot * hd..][..hd].iter_mut().zip(vh) {
                *dst = E::from_f32(x);
            }
        }
    }

    fn copy_block(&mut self, s: &Shape, src: u32, dst: u32) {
        let n = s.block();
        let (a, b) = (src as usize * n, dst as usize * n);
        for l in 0..s.num_layers {
            self.k[l].copy_within(a..a + n, b);
            self.v[l].copy_within(a..a + n, b);
        }
    }
}

enum Pool {
    F16(Layers<u16>),
    F32(Layers<f32>),
}

pub struct KvStore {
    shape: Shape,
    pool: Pool,
}

/// Where one query token attends: its own position and its sequence's block table.
#[derive(Debug, Clone, Copy)]
pub struct TokenCtx<'a> {
    pub pos: usize,
    pub table: &'a [u32],
}

impl KvStore {
    /// Panics past `MAX_BLOCK_SIZE` (the server rejects such a `--block-size` first).
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        n_kv_heads: usize,
        head_dim: usize,
        dtype: KvDtype,
    ) -> Self {
        assert!(
            (1..=MAX_BLOCK_SIZE).contains(&block_size),
            "block size {block_size} outside 1..={MAX_BLOCK_SIZE}"
        );
        let shape = Shape {
            num_layers,
            num_blocks,
            block_size,
            n_kv_heads,
            head_dim,
        };
        let pool = match dtype {
            KvDtype::F16 => Pool::F16(Layers::new(&shape)),
            KvDtype::F32 => Pool::F32(Layers::new(&shape)),
        };
        Self { shape, pool }
    }

    /// Bytes of KV one token costs across all layers (keys and values).
    pub fn bytes_per_token(
        num_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        dtype: KvDtype,
    ) -> usize {
        2 * num_layers * n_kv_heads * head_dim * dtype.bytes()
    }

    pub fn block_size(&self) -> usize {
        self.shape.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.shape.num_blocks
    }

    /// Stores the keys and values of a token (all kv heads, rows of `n_kv_heads * head_dim`).
    pub fn write(&mut self, layer: usize, ctx: TokenCtx, k: &[f32], v: &[f32]) {
        let s = &self.shape;
        match &mut self.pool {
            Pool::F16(l) => l.write(s, layer, ctx, k, v),
            Pool::F32(l) => l.write(s, layer, ctx, k, v),
        }
    }

    /// Copies a whole block in every layer (copy-on-fork).
    pub fn copy_block(&mut self, src: u32, dst: u32) {
        let s = &self.shape;
        match &mut self.pool {
            Pool::F16(l) => l.copy_block(s, src, dst),
            Pool::F32(l) => l.copy_block(s, src, dst),
        }
    }

    /// Causal attention for a batch of query tokens: `q` is `[tokens, n_heads, head_dim]`,
    /// the result has the same shape. Token `t` attends to positions `0..=ctx[t].pos` of its
    /// own sequence, whose KV (its own included) must already be written.
    pub fn attention(&self, layer: usize, q: &[f32], ctx: &[TokenCtx], n_heads: usize) -> Vec<f32> {
        match &self.pool {
            Pool::F16(l) => attention(&self.shape, &l.k[layer], &l.v[layer], q, ctx, n_heads),
            Pool::F32(l) => attention(&self.shape, &l.k[layer], &l.v[layer], q, ctx, n_heads),
        }
    }
}

/// Query heads sharing a KV head: their vectors (`[heads, head_dim]`), that KV head, the
/// score scale.
#[derive(Clone, Copy)]
struct Heads<'a> {
    q: &'a [f32],
    kv_head: usize,
    scale: f32,
}

fn attention<E: Elem>(
    s: &Shape,
    kc: &[E],
    vc: &[E],
    q: &[f32],
    ctx: &[TokenCtx],
    n_heads: usize,
) -> Vec<f32> {
    let hd = s.head_dim;
    let group = n_heads / s.n_kv_heads;
    // Query heads that share a KV head are served together, so each key and value is read
    // once for all of them (in groups of at most MAX_GROUP).
    let per_item = (1..=group.min(MAX_GROUP))
        .rev()
        .find(|g| group.is_multiple_of(*g))
        .unwrap_or(1);
    let items_per_token = n_heads / per_item;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0.0f32; q.len()];
    #[cfg(target_arch = "x86_64")]
    let vector = avx2::usable(s);
    let one = |(i, o): (usize, &mut [f32])| {
        let (t, first) = (i / items_per_token, (i % items_per_token) * per_item);
        let heads = Heads {
            q: &q[(t * n_heads + first) * hd..(t * n_heads + first + per_item) * hd],
            kv_head: first / group,
            scale,
        };
        #[cfg(target_arch = "x86_64")]
        if vector {
            // SAFETY: `usable` checked the CPU's features and the shapes the kernel needs.
            return unsafe { avx2::attend(s, heads, ctx[t], kc, vc, o) };
        }
        attend_portable(s, heads, ctx[t], kc, vc, o)
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

/// One block's scores, then weights, per query head of a work item.
type Scores = [[f32; MAX_BLOCK_SIZE]; MAX_GROUP];

/// Softmax over keys that arrive a block at a time (online: a running maximum and
/// denominator per head; what the output has accumulated is rescaled when the maximum moves).
struct OnlineSoftmax {
    max: [f32; MAX_GROUP],
    denom: [f32; MAX_GROUP],
}

impl OnlineSoftmax {
    fn new() -> Self {
        Self {
            max: [f32::NEG_INFINITY; MAX_GROUP],
            denom: [0.0; MAX_GROUP],
        }
    }

    /// Turns the scores `w[g][..len]` into weights against the running maximum (one max, one
    /// rescale and one vectorized exp per head and block).
    fn fold(&mut self, w: &mut Scores, len: usize, o: &mut [f32], hd: usize) {
        for (g, og) in o.chunks_exact_mut(hd).enumerate() {
            let w = &mut w[g][..len];
            let block_max = w.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            if block_max > self.max[g] {
                let r = (self.max[g] - block_max).exp();
                self.denom[g] *= r;
                og.iter_mut().for_each(|x| *x *= r);
                self.max[g] = block_max;
            }
            w.iter_mut().for_each(|s| *s -= self.max[g]);
            crate::exp::exp_in_place(w);
            self.denom[g] += w.iter().sum::<f32>();
        }
    }

    fn finish(&self, o: &mut [f32], hd: usize) {
        for (g, og) in o.chunks_exact_mut(hd).enumerate() {
            let inv = 1.0 / self.denom[g];
            og.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// Query heads of one token (sharing one KV head) over its sequence's keys `0..=c.pos`, in
/// plain Rust: any shape, any CPU; the oracle the vector kernel is tested against.
fn attend_portable<E: Elem>(s: &Shape, h: Heads, c: TokenCtx, kc: &[E], vc: &[E], o: &mut [f32]) {
    let (hd, bs) = (s.head_dim, s.block_size);
    let mut sm = OnlineSoftmax::new();
    let mut w: Scores = [[0.0; MAX_BLOCK_SIZE]; MAX_GROUP];
    let n = c.pos + 1;
    for (b, &block) in c.table[..n.div_ceil(bs)].iter().enumerate() {
        let len = bs.min(n - b * bs);
        let (k, v) = (
            &kc[s.base(block, h.kv_head)..][..s.region()],
            &vc[s.base(block, h.kv_head)..][..s.region()],
        );
        for (g, q) in h.q.chunks_exact(hd).enumerate() {
            for (j, wj) in w[g][..len].iter_mut().enumerate() {
                let dot: f32 = q
                    .iter()
                    .enumerate()
                    .map(|(d, x)| x * k[d * bs + j].to_f32())
                    .sum();
                *wj = dot * h.scale;
            }
        }
        sm.fold(&mut w, len, o, hd);
        for (j, row) in v.chunks_exact(hd).take(len).enumerate() {
            for (g, og) in o.chunks_exact_mut(hd).enumerate() {
                let wj = w[g][j];
                og.iter_mut()
                    .zip(row)
                    .for_each(|(y, x)| *y += wj * x.to_f32());
            }
        }
    }
    sm.finish(o, hd);
}

/// The same attention with AVX2, FMA and F16C intrinsics, for blocks and heads in multiples
/// of 8. Query heads go four at a time with two accumulators each (even and odd dimensions,
/// or keys), so eight independent FMA chains hide the FMA latency and stay in registers.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Elem, Heads, OnlineSoftmax, Scores, Shape, TokenCtx, MAX_BLOCK_SIZE, MAX_GROUP};
    use std::arch::x86_64::*;

    /// The CPU has the instructions and the shapes fit the kernel.
    pub(super) fn usable(s: &Shape) -> bool {
        crate::cpu::has_avx2_fma()
            && crate::cpu::has_f16c()
            && s.block_size.is_multiple_of(8)
            && s.head_dim.is_multiple_of(8)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8<E: Elem>(p: *const E) -> __m256 {
        if E::IS_F16 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        } else {
            _mm256_loadu_ps(p as *const f32)
        }
    }

    /// Scores of keys `col..col + 8` of a block for query heads `g0..g0 + G`:
    /// `w[g][col..col + 8]`. `k` is the block's `[head dim][slot]` region.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn score8<const G: usize, E: Elem>(
        h: &Heads,
        g0: usize,
        k: *const E,
        bs: usize,
        hd: usize,
        col: usize,
        w: &mut Scores,
    ) {
        let q = h.q.as_ptr().add(g0 * hd);
        let mut acc = [[_mm256_setzero_ps(); 2]; G];
        for d in (0..hd).step_by(2) {
            let k0 = load8(k.add(d * bs + col));
            let k1 = load8(k.add((d + 1) * bs + col));
            for (g, a) in acc.iter_mut().enumerate() {
                let qg = q.add(g * hd + d);
                a[0] = _mm256_fmadd_ps(_mm256_set1_ps(*qg), k0, a[0]);
                a[1] = _mm256_fmadd_ps(_mm256_set1_ps(*qg.add(1)), k1, a[1]);
            }
        }
        let scale = _mm256_set1_ps(h.scale);
        for (g, a) in acc.iter().enumerate() {
            let s = _mm256_mul_ps(_mm256_add_ps(a[0], a[1]), scale);
            _mm256_storeu_ps(w[g0 + g].as_mut_ptr().add(col), s);
        }
    }

    /// Adds `w[g][j] * v[j]` over the block's first `len` value rows to the outputs of query
    /// heads `g0..g0 + G`, eight dimensions at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn add_values<const G: usize, E: Elem>(
        g0: usize,
        v: *const E,
        len: usize,
        hd: usize,
        w: &Scores,
        o: *mut f32,
    ) {
        for i in (0..hd).step_by(8) {
            let mut acc = [[_mm256_setzero_ps(); 2]; G];
            for (g, a) in acc.iter_mut().enumerate() {
                a[0] = _mm256_loadu_ps(o.add((g0 + g) * hd + i));
            }
            let mut j = 0;
            while j + 1 < len {
                let v0 = load8(v.add(j * hd + i));
                let v1 = load8(v.add((j + 1) * hd + i));
                for (g, a) in acc.iter_mut().enumerate() {
                    let wg = &w[g0 + g];
                    a[0] = _mm256_fmadd_ps(_mm256_set1_ps(wg[j]), v0, a[0]);
                    a[1] = _mm256_fmadd_ps(_mm256_set1_ps(wg[j + 1]), v1, a[1]);
                }
                j += 2;
            }
            if j < len {
                let v0 = load8(v.add(j * hd + i));
                for (g, a) in acc.iter_mut().enumerate() {
                    a[0] = _mm256_fmadd_ps(_mm256_set1_ps(w[g0 + g][j]), v0, a[0]);
                }
            }
            for (g, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.add((g0 + g) * hd + i), _mm256_add_ps(a[0], a[1]));
            }
        }
    }

    /// Query heads of one token (sharing one KV head) over its sequence's keys `0..=c.pos`.
    ///
    /// # Safety
    /// `usable(s)` must hold; `kc`/`vc` are one layer of a pool of shape `s`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend<E: Elem>(
        s: &Shape,
        h: Heads,
        c: TokenCtx,
        kc: &[E],
        vc: &[E],
        o: &mut [f32],
    ) {
        let (hd, bs) = (s.head_dim, s.block_size);
        let heads = h.q.len() / hd;
        debug_assert!(heads <= MAX_GROUP && bs <= MAX_BLOCK_SIZE && o.len() == heads * hd);
        let mut sm = OnlineSoftmax::new();
        let mut w: Scores = [[0.0; MAX_BLOCK_SIZE]; MAX_GROUP];
        let n = c.pos + 1;
        for (b, &block) in c.table[..n.div_ceil(bs)].iter().enumerate() {
            let len = bs.min(n - b * bs);
            let base = s.base(block, h.kv_head);
            // Bounds once per block; the kernels then read inside the region.
            let (k, v) = (&kc[base..][..s.region()], &vc[base..][..s.region()]);
            let (k, v) = (k.as_ptr(), v.as_ptr());
            for g0 in (0..heads).step_by(4) {
                for col in (0..len).step_by(8) {
                    match heads - g0 {
                        1 => score8::<1, E>(&h, g0, k, bs, hd, col, &mut w),
                        2 => score8::<2, E>(&h, g0, k, bs, hd, col, &mut w),
                        3 => score8::<3, E>(&h, g0, k, bs, hd, col, &mut w),
                        _ => score8::<4, E>(&h, g0, k, bs, hd, col, &mut w),
                    }
                }
            }
            sm.fold(&mut w, len, o, hd);
            let op = o.as_mut_ptr();
            for g0 in (0..heads).step_by(4) {
                match heads - g0 {
                    1 => add_values::<1, E>(g0, v, len, hd, &w, op),
                    2 => add_values::<2, E>(g0, v, len, hd, &w, op),
                    3 => add_values::<3, E>(g0, v, len, hd, &w, op),
                    _ => add_values::<4, E>(g0, v, len, hd, &w, op),
                }
            }
        }
        sm.finish(o, hd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

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

    /// Writes 40 positions through a scattered block table and checks query tokens inside,
    /// at and across block boundaries against the oracle (over the values as stored).
    fn paged_matches_contiguous(bs: usize, hd: usize, n_kv: usize, n_heads: usize, dtype: KvDtype) {
        let mut store = KvStore::new(1, 64, bs, n_kv, hd, dtype);
        let len: usize = 40;
        // Deliberately out of order.
        let table: Vec<u32> = (0..len.div_ceil(bs))
            .map(|b| ((b * 37 + 5) % 64) as u32)
            .collect();
        let stored = |x: f32| match dtype {
            KvDtype::F16 => f16::from_f32(x).to_f32(),
            KvDtype::F32 => x,
        };
        let val = |p: usize, i: usize, salt: f32| ((p * 31 + i * 7) as f32 * 0.37 + salt).sin();
        let mut ks = vec![vec![]; n_kv];
        let mut vs = vec![vec![]; n_kv];
        for p in 0..len {
            let k: Vec<f32> = (0..n_kv * hd).map(|i| val(p, i, 0.1)).collect();
            let v: Vec<f32> = (0..n_kv * hd).map(|i| val(p, i, 0.9)).collect();
            let ctx = TokenCtx {
                pos: p,
                table: &table,
            };
            store.write(0, ctx, &k, &v);
            for h in 0..n_kv {
                ks[h].push(k[h * hd..(h + 1) * hd].iter().map(|&x| stored(x)).collect());
                vs[h].push(v[h * hd..(h + 1) * hd].iter().map(|&x| stored(x)).collect());
            }
        }
        // Large enough scores that the running maximum moves between blocks.
        let ctx = [0, 6, 10, 15, 16, 17, 39].map(|pos| TokenCtx { pos, table: &table });
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
                    assert!(
                        (a - b).abs() < 2e-5,
                        "bs {bs} hd {hd} heads {n_heads}/{n_kv} {dtype:?} pos {}: {a} vs {b}",
                        c.pos
                    );
                }
            }
        }
    }

    #[test]
    fn paged_matches_contiguous_with_scattered_blocks_and_gqa() {
        for dtype in [KvDtype::F32, KvDtype::F16] {
            // The portable path (blocks of 4), SmolLM2's shape on the vector path, groups of
            // 4, 5 (four heads, then one) and 8 (two fours), blocks of 8 and 32.
            paged_matches_contiguous(4, 8, 2, 6, dtype);
            paged_matches_contiguous(16, 64, 3, 9, dtype);
            paged_matches_contiguous(8, 16, 2, 8, dtype);
            paged_matches_contiguous(16, 8, 2, 10, dtype);
            paged_matches_contiguous(32, 16, 1, 8, dtype);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_kernel_matches_portable_one() {
        let s = Shape {
            num_layers: 1,
            num_blocks: 8,
            block_size: 16,
            n_kv_heads: 1,
            head_dim: 64,
        };
        if !avx2::usable(&s) {
            eprintln!("no AVX2/FMA/F16C here: nothing to compare");
            return;
        }
        let kc: Vec<u16> = (0..8 * s.block())
            .map(|i| u16::from_f32((i as f32 * 0.71).sin()))
            .collect();
        let vc: Vec<u16> = (0..8 * s.block())
            .map(|i| u16::from_f32((i as f32 * 0.29).cos()))
            .collect();
        let table = [3u32, 7, 0, 5, 1];
        let q: Vec<f32> = (0..3 * 64).map(|i| (i as f32 * 0.05).sin() * 3.0).collect();
        for pos in [0, 7, 8, 15, 16, 40, 79] {
            let h = Heads {
                q: &q,
                kv_head: 0,
                scale: 0.125,
            };
            let c = TokenCtx { pos, table: &table };
            let (mut a, mut b) = (vec![0.0; q.len()], vec![0.0; q.len()]);
            attend_portable(&s, h, c, &kc, &vc, &mut a);
            // SAFETY: `usable` holds.
            unsafe { avx2::attend(&s, h, c, &kc, &vc, &mut b) };
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-5, "pos {pos}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn copy_block_duplicates_every_layer() {
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let mut s = KvStore::new(2, 2, 2, 1, 2, dtype);
            for l in 0..2 {
                let ctx = TokenCtx {
                    pos: 1,
                    table: &[0],
                };
                s.write(l, ctx, &[1.0, 2.0], &[3.0, 4.0]);
            }
            s.copy_block(0, 1);
            let q = [1.0, 0.0];
            for l in 0..2 {
                let ctx = TokenCtx {
                    pos: 1,
                    table: &[1],
                };
                let out = s.attention(l, &q, &[ctx], 1);
                // Slot 0 of block 1 is zeros, slot 1 is the copied (3, 4).
                assert!(out[0] > 1.5 && out[1] > 2.0, "{out:?}");
            }
        }
    }

    #[test]
    fn f16_halves_the_bytes_per_token() {
        assert_eq!(KvStore::bytes_per_token(30, 3, 64, KvDtype::F32), 46_080);
        assert_eq!(KvStore::bytes_per_token(30, 3, 64, KvDtype::F16), 23_040);
    }
}
