//! redline-load: drives an InferenceService on a real cluster with a slice of a request trace
//! and records what the autoscaling loop did about it, from outside (the closed-loop test and
//! the README's main job both use it).
//!
//! - [`workload`]: which requests, with prompts of a known length.
//! - [`transport`]: pod IP (streaming, TTFT) or the API server's pod proxy.
//! - [`replay`]: each request at its time, to a ready pod, rerouted if a pod refuses it.
//! - [`observe`]: the service, its pods, their engines' and sidecars' metrics.
//! - [`run`]: both together, then the wait for the scale-down and the Events.
//! - [`report`] and [`plot`]: the live row, the guard's reactions, the summary, the PNG.

pub mod observe;
pub mod plot;
pub mod replay;
pub mod report;
pub mod run;
pub mod transport;
pub mod workload;
