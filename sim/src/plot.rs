//! The PNG: load, replicas and KV usage over time, one line per policy.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::fleet::Outcome;
use crate::trace::Request;

const COLORS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(127, 127, 127),
];

fn font() {
    // Bundled, so the plot has text on a machine without fonts.
    let _ =
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
}

/// Arriving tokens (prompt + output) per second, in `bin`-second bins.
fn load(trace: &[Request], bin: f64, end: f64) -> Vec<(f64, f64)> {
    let n = (end / bin).ceil() as usize + 1;
    let mut v = vec![0.0; n];
    for r in trace {
        let i = ((r.arrival / bin) as usize).min(n - 1);
        v[i] += (r.prompt_tokens + r.output_tokens) as f64 / bin;
    }
    v.into_iter()
        .enumerate()
        .map(|(i, x)| (i as f64 * bin, x))
        .collect()
}

pub fn write(path: &Path, title: &str, trace: &[Request], runs: &[&Outcome]) -> Result<()> {
    font();
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    let end = runs.iter().map(|o| o.duration_seconds).fold(1.0, f64::max) + 60.0;
    let minutes = end / 60.0;
    let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 26))
        .map_err(|e| err(&e))?;
    let panels = root.split_evenly((3, 1));

    let l = load(trace, 10.0, end);
    let top = l.iter().map(|p| p.1).fold(1.0, f64::max) * 1.05;
    let mut c = ChartBuilder::on(&panels[0])
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(80)
        .caption("load: arriving tokens/s (10 s bins)", ("sans-serif", 20))
        .build_cartesian_2d(0.0..minutes, 0.0..top)
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc("minutes")
        .draw()
        .map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(
        l.iter().map(|&(t, v)| (t / 60.0, v)),
        BLACK.stroke_width(1),
    ))
    .map_err(|e| err(&e))?;

    let max_r = runs
        .iter()
        .flat_map(|o| o.series.iter().map(|s| s.replicas))
        .max()
        .unwrap_or(1) as f64
        + 1.0;
    let mut c = ChartBuilder::on(&panels[1])
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(80)
        .caption("replicas (starting + ready + draining)", ("sans-serif", 20))
        .build_cartesian_2d(0.0..minutes, 0.0..max_r)
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc("minutes")
        .draw()
        .map_err(|e| err(&e))?;
    for (i, o) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        c.draw_series(LineSeries::new(
            o.series
                .iter()
                .filter(|s| s.t <= end)
                .map(|s| (s.t / 60.0, s.replicas as f64)),
            color.stroke_width(if i == 0 { 3 } else { 2 }),
        ))
        .map_err(|e| err(&e))?
        .label(o.name.clone())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(&e))?;

    let mut c = ChartBuilder::on(&panels[2])
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(80)
        .caption("highest KV-cache usage of any pod", ("sans-serif", 20))
        .build_cartesian_2d(0.0..minutes, 0.0..1.05)
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc("minutes")
        .draw()
        .map_err(|e| err(&e))?;
    for (i, o) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        c.draw_series(LineSeries::new(
            o.series
                .iter()
                .filter(|s| s.t <= end)
                .map(|s| (s.t / 60.0, s.max_kv_usage)),
            color.stroke_width(if i == 0 { 2 } else { 1 }),
        ))
        .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
