//! redline-engine: a paged-KV, continuously batching LLM server whose batch limits move live.
//!
//! Pure logic (no I/O): [`block_pool`], [`kv_cache_manager`], [`scheduler`], [`sampling`].
//! Compute: [`model`] (one forward pass per step) over [`paged_attention`], with our matmul
//! kernels [`q4_matmul`] and [`q8_matmul`] on activations quantized by `quantize`; `exp` for
//! softmax and SiLU.
//! Text: [`tokenizer`]. The step loop: [`engine`], run on a thread by [`worker`].
//! Serving: [`server`] (OpenAI API, admin API), [`drain`], [`metrics`]. Model download: [`fetch`].

pub mod admin;
pub mod api_keys;
pub mod bench;
pub mod block_pool;
pub mod burst_bench;
mod cpu;
pub mod drain;
pub mod engine;
mod exp;
pub mod fetch;
pub mod kv_cache_manager;
pub mod metrics;
pub mod model;
pub mod openai;
pub mod paged_attention;
mod prepare;
pub mod q4_matmul;
pub mod q8_matmul;
mod quantize;
pub mod responses;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod tokenizer;
pub mod worker;
