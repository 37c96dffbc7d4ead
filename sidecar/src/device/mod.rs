//! Device backends behind one trait: what memory the engine's device has left and how healthy it
//! is. `nvml` for GPUs, `cgroup` for CPU pods, `none` when neither applies.

mod cgroup;
mod nvml;

use std::time::Duration;

pub use cgroup::CgroupDevice;
pub use nvml::NvmlDevice;
use redline_api::DeviceReading;

pub trait Device: Send + Sync {
    /// The latest reading (never blocks for long: slow backends sample on their own thread).
    fn read(&self) -> DeviceReading;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    /// NVML if a GPU driver is present, else the pod's cgroup, else none.
    Auto,
    Nvml,
    Cgroup,
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("NVML is not available ({0}); no NVIDIA driver on this machine? Use --device cgroup for CPU pods")]
    NvmlUnavailable(String),
    #[error("NVML: {0}")]
    Nvml(String),
    #[error("no cgroup memory controller found ({0})")]
    NoCgroup(String),
}

/// The no-device backend: the engine's metrics are the only signals.
pub struct NoDevice;

impl Device for NoDevice {
    fn read(&self) -> DeviceReading {
        DeviceReading {
            backend: "none".into(),
            ..Default::default()
        }
    }
}

/// Opens the backend `kind` asks for. `Auto` says in one line which it chose and why.
pub fn open(
    kind: DeviceKind,
    gpu: Option<&str>,
    interval: Duration,
) -> Result<Box<dyn Device>, DeviceError> {
    match kind {
        DeviceKind::Nvml => Ok(Box::new(NvmlDevice::open(gpu, interval)?)),
        DeviceKind::Cgroup => Ok(Box::new(CgroupDevice::for_this_process()?)),
        DeviceKind::None => Ok(Box::new(NoDevice)),
        DeviceKind::Auto => match NvmlDevice::open(gpu, interval) {
            Ok(d) => Ok(Box::new(d)),
            Err(e) => match CgroupDevice::for_this_process() {
                Ok(c) => {
                    tracing::info!("device: cgroup memory ({e})");
                    Ok(Box::new(c))
                }
                Err(c) => {
                    tracing::info!("device: none ({e}; {c})");
                    Ok(Box::new(NoDevice))
                }
            },
        },
    }
}
