//! redline-sim: a discrete-event model of an autoscaled fleet of LLM engine pods, driven by a
//! request trace and steered by the operator's own policy code (and the sidecar's own guard),
//! next to the baselines people run today.
//!
//! - [`trace`]: Azure-format traces, time compression and token scaling.
//! - [`profile`]: engine step times and KV pools (a GPU-served 8B model, our CPU engine).
//! - [`engine`]: one replica's scheduler and KV pool.
//! - [`fleet`]: pods, cold starts, routing, sidecars, the event loop.
//! - [`scalers`]: redline, static N, HPA on queue length, KPA on KV usage, the oracle.
//! - [`reversal_cap`]: what counts as a reversal, and the oracle held to the cap.
//! - [`compare`]: all of them on one trace; [`report`] and [`plot`] show the result.
//! - [`targets`]: the targets, checked on the target and held-out replays.

pub mod compare;
pub mod engine;
pub mod fleet;
pub mod plot;
pub mod profile;
pub mod report;
pub mod reversal_cap;
pub mod scalers;
pub mod targets;
pub mod trace;
