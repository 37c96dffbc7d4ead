//! The PNG: load, replicas and KV usage over time, one line per policy.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::fleet::Outcome;
use crate::trace::Request;

pub const RED: RGBColor = RGBColor(214, 39, 40);
pub const BLUE: RGBColor = RGBColor(31, 119, 180);
pub const CYAN: RGBColor = RGBColor(23, 190, 207);
pub const ORANGE: RGBColor = RGBColor(255, 127, 14);
pub const GREEN: RGBColor = RGBColor(44, 160, 44);
pub const PURPLE: RGBColor = RGBColor(148, 103, 189);
pub const GREY: RGBColor = RGBColor(127, 127, 127);
pub const BROWN: RGBColor = RGBColor(140, 86, 75);

/// One per row of the comparison (redline first), so no two policies share a colour. Plots
/// that name a colour in a title use the constants above, not a position here.
pub const COLORS: [RGBColor; 8] = [RED, BLUE, CYAN, ORANGE, GREEN, PURPLE, GREY, BROWN];

pub fn font() {
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

pub type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
pub type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// One panel over time (minutes) with its caption and mesh drawn.
pub fn panel<'a, 'b>(
    area: &'a Area<'b>,
    caption: &str,
    minutes: f64,
    top: f64,
) -> Result<Chart<'a, 'b>> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting {caption}: {e}");
    let mut c = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(80)
        .caption(caption, ("sans-serif", 20))
        .build_cartesian_2d(0.0..minutes, 0.0..top)
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc("minutes")
        .draw()
        .map_err(|e| err(&e))?;
    Ok(c)
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
    let mut c = panel(
        &panels[0],
        "load: arriving tokens/s (10 s bins)",
        minutes,
        top,
    )?;
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
    let mut c = panel(
        &panels[1],
        "replicas (starting + ready + draining)",
        minutes,
        max_r,
    )?;
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

    let mut c = panel(
        &panels[2],
        "highest KV-cache usage of any pod",
        minutes,
        1.05,
    )?;
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
