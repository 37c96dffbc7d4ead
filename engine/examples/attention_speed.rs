//! Decode attention at 32 streams, as in the bench: 32 sequences at position 191 (prompt 128,
//! half of 128 generated), SmolLM2's shape (30 layers, 9 query heads over 3 KV heads of 64),
//! blocks shuffled across the pool as a long-running server leaves them.
//! `cargo run --release --example attention_speed`
use redline_engine::paged_attention::{KvDtype, KvStore, TokenCtx};
fn main() {
    let (layers, n_kv, hd, n_heads, bs) = (30usize, 3usize, 64usize, 9usize, 16usize);
    let (seqs, pos) = (32usize, 191usize);
    let per_seq = (pos + 1).div_ceil(bs);
    let blocks = seqs * per_seq;
    let dtype = if std::env::var("F32").is_ok() {
        KvDtype::F32
    } else {
        KvDtype::F16
    };
    let mut store = KvStore::new(layers, blocks, bs, n_kv, hd, dtype);
    // Block b of sequence s sits at a scattered pool index.
    let tables: Vec<Vec<u32>> = (0..seqs)
        .map(|s| {
            (0..per_seq)
                .map(|b| ((b * seqs + s) * 7919 % blocks) as u32)
                .collect()
        })
        .collect();
    let row: Vec<f32> = (0..n_kv * hd).map(|i| (i as f32 * 0.37).sin()).collect();
    for l in 0..layers {
        for t in &tables {
            for p in 0..=pos {
                store.write(l, TokenCtx { pos: p, table: t }, &row, &row);
            }
        }
    }
    let shared = std::env::var("SHARED").is_ok();
    let ctx: Vec<TokenCtx> = tables
        .iter()
        .map(|t| TokenCtx {
            pos,
            table: if shared { &tables[0] } else { t },
        })
        .collect();
    let q: Vec<f32> = (0..seqs * n_heads * hd)
        .map(|i| (i as f32 * 0.13).cos())
        .collect();
    let best = (0..7)
        .map(|_| {
            let t0 = std::time::Instant::now();
            for l in 0..layers {
                std::hint::black_box(store.attention(l, &q, &ctx, n_heads));
            }
            t0.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    let bytes = seqs * (pos + 1) * KvStore::bytes_per_token(layers, n_kv, hd, dtype);
    println!(
        "one decode step, {seqs} streams at position {pos}: {:.2} ms, KV read {:.0} MB ({:.1} GB/s)",
        best * 1e3,
        bytes as f64 / 1e6,
        bytes as f64 / best / 1e9
    );
}
