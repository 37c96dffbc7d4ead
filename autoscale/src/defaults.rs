//! The policy's default settings: what an AutoscalingPolicy that leaves a field out gets (the
//! operator's CRD defaults), and what `redline-sim` measures unless told otherwise. One place,
//! so the numbers the docs report are the numbers a user runs.

/// A GPU pod's time to Ready (the forecast horizon is at least that).
pub const FORECAST_HORIZON_SECONDS: f64 = 60.0;
/// The trend is fitted over this window...
pub const TREND_WINDOW_SECONDS: f64 = 75.0;
/// ...to the demand averaged again over this one (docs/autoscaling.md, "The trend of the
/// demand averaged twice").
pub const TREND_SMOOTHING_SECONDS: f64 = 15.0;
pub const DEMAND_SMOOTHING_SECONDS: f64 = 10.0;
pub const SCALE_UP_COOLDOWN_SECONDS: f64 = 10.0;
pub const SCALE_DOWN_WINDOW_SECONDS: f64 = 300.0;
pub const MAX_STEP: u32 = 2;
pub const DRAIN_TIMEOUT_SECONDS: f64 = 120.0;
/// Pressure reports older than this are stale (a sidecar reads its engine every 250 ms).
pub const STALE_AFTER_SECONDS: f64 = 10.0;
