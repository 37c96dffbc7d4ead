//! The PNG of a run: load, replicas and every pod's KV usage over time.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use redline_sim::plot::{font, panel, BLUE, COLORS, GREEN, ORANGE, RED};

use crate::run::Run;

pub fn write(path: &Path, title: &str, run: &Run, redline: f64) -> Result<()> {
    font();
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    let end = run.samples.last().map_or(1.0, |s| s.t).max(1.0);
    let minutes = end / 60.0;
    let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 24))
        .map_err(|e| err(&e))?;
    let panels = root.split_evenly((3, 1));
    let at = |t: f64| t / 60.0;

    let top = run
        .samples
        .iter()
        .map(|s| s.arrival_rate.max(s.in_flight as f64))
        .fold(1.0, f64::max)
        * 1.1;
    let mut c = panel(
        &panels[0],
        "load: requests/s arriving (black), in flight (blue), served after the TTFT objective (red)",
        minutes,
        top,
    )?;
    c.draw_series(LineSeries::new(
        run.samples.iter().map(|s| (at(s.t), s.arrival_rate)),
        BLACK.stroke_width(2),
    ))
    .map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(
        run.samples.iter().map(|s| (at(s.t), s.in_flight as f64)),
        BLUE.stroke_width(2),
    ))
    .map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(
        run.samples
            .iter()
            .filter_map(|s| Some((at(s.t), s.late_per_second?))),
        RED.stroke_width(2),
    ))
    .map_err(|e| err(&e))?;

    let top = run
        .samples
        .iter()
        .map(|s| s.desired.max(s.pods as i32))
        .max()
        .unwrap_or(1) as f64
        + 1.0;
    let mut c = panel(
        &panels[1],
        "replicas: desired (red), pods (orange), ready (green)",
        minutes,
        top,
    )?;
    for (color, f) in [
        (
            RED,
            (|s: &crate::observe::Sample| s.desired as f64) as fn(&_) -> f64,
        ),
        (ORANGE, |s| s.pods as f64),
        (GREEN, |s| s.ready as f64),
    ] {
        c.draw_series(LineSeries::new(
            run.samples.iter().map(|s| (at(s.t), f(s))),
            color.stroke_width(2),
        ))
        .map_err(|e| err(&e))?;
    }

    let mut c = panel(
        &panels[2],
        &format!(
            "KV-cache usage per pod (the guard's redline {:.0}% dashed)",
            redline * 100.0
        ),
        minutes,
        1.05,
    )?;
    for (i, series) in run.pods.values().enumerate() {
        c.draw_series(LineSeries::new(
            series.iter().map(|p| (at(p.t), p.kv)),
            COLORS[(i + 1) % COLORS.len()].stroke_width(1),
        ))
        .map_err(|e| err(&e))?;
    }
    c.draw_series(DashedLineSeries::new(
        [(0.0, redline), (minutes, redline)],
        6,
        4,
        RED.stroke_width(1),
    ))
    .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
