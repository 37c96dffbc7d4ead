//! redline-sidecar: the fast local loop next to each engine. It reads device memory (NVML or the
//! pod's cgroup) and the engine's KV pressure, forecasts the time to redline, lowers the
//! engine's batch limits before the KV cache runs out, and reports to the operator.

pub mod arrivals;
pub mod device;
pub mod guard;
pub mod metrics;
pub mod pressure;
pub mod scrape;
pub mod server;
pub mod sidecar;
