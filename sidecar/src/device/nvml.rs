//! GPUs through NVML (`nvml-wrapper`). libnvidia-ml is loaded at run time, so the sidecar starts
//! on a machine without a driver and says so. One thread owns the NVML handle: it samples every
//! interval and, between samples, waits on NVML's event set for critical XID errors.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device as NvmlGpu, Nvml};
use redline_api::{DeviceHealth, DeviceReading};

use super::{Device, DeviceError};

pub struct NvmlDevice {
    latest: Arc<Mutex<DeviceReading>>,
}

/// Which GPU: `--gpu` (an index or a `GPU-...` UUID), else the first of
/// `NVIDIA_VISIBLE_DEVICES` (the device plugin puts the pod's GPU UUIDs there), else index 0.
pub fn gpu_selector(flag: Option<&str>, visible: Option<&str>) -> String {
    flag.map(str::to_owned)
        .or_else(|| {
            visible
                .and_then(|v| v.split(',').next())
                .map(str::trim)
                .filter(|v| !v.is_empty() && !matches!(*v, "all" | "none" | "void"))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "0".into())
}

fn find<'n>(nvml: &'n Nvml, sel: &str) -> Result<NvmlGpu<'n>, NvmlError> {
    match sel.parse::<u32>() {
        Ok(i) => nvml.device_by_index(i),
        Err(_) => nvml.device_by_uuid(sel),
    }
}

/// One reading; `name` is read once at start (it does not change).
fn sample(gpu: &NvmlGpu<'_>, name: &Option<String>, health: &DeviceHealth) -> DeviceReading {
    let mem = gpu.memory_info().ok();
    DeviceReading {
        backend: "nvml".into(),
        name: name.clone(),
        memory_used_bytes: mem.as_ref().map(|m| m.used),
        memory_total_bytes: mem.as_ref().map(|m| m.total),
        utilization_ratio: gpu.utilization_rates().ok().map(|u| u.gpu as f64 / 100.0),
        temperature_celsius: gpu.temperature(TemperatureSensor::Gpu).ok().map(f64::from),
        power_watts: gpu.power_usage().ok().map(|mw| mw as f64 / 1000.0),
        memory_stall_percent: None,
        health: DeviceHealth {
            ecc_uncorrected: gpu
                .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                .ok(),
            ..health.clone()
        },
    }
}

impl NvmlDevice {
    pub fn open(gpu: Option<&str>, interval: Duration) -> Result<Self, DeviceError> {
        let sel = gpu_selector(gpu, std::env::var("NVIDIA_VISIBLE_DEVICES").ok().as_deref());
        let latest = Arc::new(Mutex::new(DeviceReading {
            backend: "nvml".into(),
            ..Default::default()
        }));
        let (tx, rx) = mpsc::channel::<Result<String, DeviceError>>();
        let shared = latest.clone();
        std::thread::Builder::new()
            .name("nvml".into())
            .spawn(move || {
                let nvml = match Nvml::init() {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Err(DeviceError::NvmlUnavailable(e.to_string())));
                        return;
                    }
                };
                let gpu = match find(&nvml, &sel) {
                    Ok(g) => g,
                    Err(e) => {
                        let _ = tx.send(Err(DeviceError::Nvml(format!("GPU {sel}: {e}"))));
                        return;
                    }
                };
                // XID events are not supported everywhere (e.g. some vGPUs): then health
                // has no XID count, and the thread just sleeps between samples.
                let events = nvml
                    .create_event_set()
                    .map_err(|e| e.to_string())
                    .and_then(|set| {
                        gpu.register_events(EventTypes::CRITICAL_XID_ERROR, set)
                            .map_err(|e| e.to_string())
                    });
                let mut health = DeviceHealth::default();
                if events.is_ok() {
                    health.xid_errors = Some(0);
                }
                let name = gpu.name().ok();
                let first = sample(&gpu, &name, &health);
                let _ = tx.send(Ok(format!(
                    "{} ({})",
                    first.name.clone().unwrap_or_default(),
                    gpu.uuid().unwrap_or(sel)
                )));
                *shared.lock().unwrap() = first;
                loop {
                    match &events {
                        Ok(set) => match set.wait(interval.as_millis() as u32) {
                            Ok(ev) => {
                                let xid = match ev.event_data {
                                    Some(XidError::Value(v)) => Some(v),
                                    _ => None,
                                };
                                tracing::warn!(xid = ?xid, "GPU reported a critical XID error");
                                health.xid_errors = Some(health.xid_errors.unwrap_or(0) + 1);
                                health.last_xid = xid.or(health.last_xid);
                            }
                            Err(NvmlError::Timeout) => {}
                            Err(_) => std::thread::sleep(interval),
                        },
                        Err(_) => std::thread::sleep(interval),
                    }
                    *shared.lock().unwrap() = sample(&gpu, &name, &health);
                }
            })
            .map_err(|e| DeviceError::Nvml(format!("starting the NVML thread: {e}")))?;
        match rx.recv() {
            Ok(Ok(what)) => {
                tracing::info!("device: NVML, {what}");
                Ok(Self { latest })
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DeviceError::Nvml("the NVML thread stopped".into())),
        }
    }
}

impl Device for NvmlDevice {
    fn read(&self) -> DeviceReading {
        self.latest.lock().unwrap().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_the_flag_then_the_visible_devices_then_zero() {
        assert_eq!(gpu_selector(Some("2"), Some("GPU-a")), "2");
        assert_eq!(gpu_selector(None, Some("GPU-a,GPU-b")), "GPU-a");
        assert_eq!(gpu_selector(None, Some("all")), "0");
        assert_eq!(gpu_selector(None, None), "0");
    }

    #[test]
    fn without_a_driver_nvml_says_so() {
        // On a machine with a driver this opens the GPU instead; both are fine, a panic is not.
        match NvmlDevice::open(None, Duration::from_millis(100)) {
            Ok(d) => assert_eq!(d.read().backend, "nvml"),
            Err(e) => assert!(e.to_string().contains("NVML"), "{e}"),
        }
    }
}
