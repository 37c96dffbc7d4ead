//! redline's autoscaling policy, as plain data and functions: no I/O, no clock of its own.
//! The operator feeds it the sidecars' pressure reports every few seconds; the simulator feeds
//! it the same reports from its model engines. Same code, same decisions.
//!
//! - [`demand`]: per-pod signals to "replicas needed at the target utilization".
//! - [`budget`]: the SLO's error budget, and the margin it asks for.
//! - [`defaults`]: the settings a policy gets unless told otherwise.
//! - [`policy`]: demand over time to a replica count, a pod to drain, per-pod limits and a
//!   reason.

pub mod budget;
pub mod defaults;
pub mod demand;
pub mod policy;

pub use demand::{
    default_target_kv_usage, default_target_utilization, Demand, PodSignals, ReplicaCapacity,
};
pub use policy::{
    Action, Decision, Observation, PodPhase, PodView, Policy, PolicyConfig, PolicyMemory,
    SampleMemory,
};
