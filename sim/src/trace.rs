//! Request traces in the Azure LLM inference format (`TIMESTAMP,ContextTokens,GeneratedTokens`),
//! as published in Azure/AzurePublicDataset (Patel et al., "Splitwise", ISCA 2024, CC-BY 4.0).

use std::path::Path;

use anyhow::{bail, Context, Result};
use chrono::NaiveDateTime;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Request {
    /// Seconds after the first request of the trace.
    pub arrival: f64,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
}

/// How to replay a trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Replay {
    /// Arrival times are divided by this (4 replays an hour in 15 minutes).
    pub time_compression: f64,
    /// Prompt and output lengths are multiplied by this.
    pub token_scale: f64,
    /// Only requests arriving in the first this-many seconds (after compression).
    pub duration: Option<f64>,
}

impl Default for Replay {
    fn default() -> Self {
        Self {
            time_compression: 1.0,
            token_scale: 1.0,
            duration: None,
        }
    }
}

#[derive(Debug, Deserialize)]
struct Row {
    #[serde(rename = "TIMESTAMP")]
    timestamp: String,
    #[serde(rename = "ContextTokens")]
    context: u32,
    #[serde(rename = "GeneratedTokens")]
    generated: u32,
}

fn parse_time(s: &str) -> Result<NaiveDateTime> {
    // Azure's timestamps carry 7 fractional digits; chrono reads at most 9.
    NaiveDateTime::parse_from_str(s.trim(), "%Y-%m-%d %H:%M:%S%.f")
        .with_context(|| format!("timestamp {s:?} is not YYYY-MM-DD HH:MM:SS.fffffff"))
}

/// Reads a trace, sorted by arrival, with at least one token in and out per request.
pub fn read(path: &Path, replay: Replay) -> Result<Vec<Request>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    parse(file, replay).with_context(|| format!("reading {}", path.display()))
}

pub fn parse(input: impl std::io::Read, replay: Replay) -> Result<Vec<Request>> {
    if replay.time_compression <= 0.0 || replay.token_scale <= 0.0 {
        bail!("time compression and token scale must be positive");
    }
    let mut rows = Vec::new();
    for (i, row) in csv::Reader::from_reader(input)
        .deserialize::<Row>()
        .enumerate()
    {
        let row = row.with_context(|| format!("row {}", i + 2))?;
        rows.push((parse_time(&row.timestamp)?, row.context, row.generated));
    }
    let Some(t0) = rows.iter().map(|r| r.0).min() else {
        bail!("the trace has no requests");
    };
    let scale = |n: u32| ((n as f64 * replay.token_scale).round() as u32).max(1);
    let mut out: Vec<Request> = rows
        .into_iter()
        .map(|(t, c, g)| Request {
            arrival: (t - t0).num_microseconds().unwrap_or(0) as f64
                / 1e6
                / replay.time_compression,
            prompt_tokens: scale(c),
            output_tokens: scale(g),
        })
        .filter(|r| replay.duration.is_none_or(|d| r.arrival < d))
        .collect();
    out.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    Ok(out)
}

/// `trace` with its first `seconds` replayed once before it: the requests arriving in them,
/// then the whole trace `seconds` later. A replay that starts on an idle fleet measures the
/// fleet filling up (empty KV pools, no demand history) as much as the trace; with this in
/// front and [`crate::fleet::SimConfig::measure_from_seconds`] set to `seconds`, every policy
/// meets the trace's first request in the state the same load leaves a fleet in, which is
/// where a service that was already running stands.
pub fn with_warm_up(trace: &[Request], seconds: f64) -> Vec<Request> {
    let warm_up = trace.iter().take_while(|r| r.arrival < seconds).copied();
    let shifted = trace.iter().map(|r| Request {
        arrival: r.arrival + seconds,
        ..*r
    });
    warm_up.chain(shifted).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:04.0319600,3180,8
2023-11-16 18:17:03.9799600,4808,10
2023-11-16 18:17:13.9799600,100,0
";

    #[test]
    fn reads_sorts_and_scales() {
        let r = parse(CSV.as_bytes(), Replay::default()).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].arrival, r[0].prompt_tokens), (0.0, 4808));
        assert!((r[1].arrival - 0.052).abs() < 1e-9);
        assert_eq!(r[2].output_tokens, 1, "at least one token out");
        let r = parse(
            CSV.as_bytes(),
            Replay {
                time_compression: 2.0,
                token_scale: 0.5,
                duration: Some(5.0),
            },
        )
        .unwrap();
        assert_eq!(r.len(), 2, "the request at 10 s (compressed) is cut");
        assert_eq!(r[0].prompt_tokens, 2404);
    }

    #[test]
    fn a_warm_up_replays_the_first_seconds_before_the_trace() {
        let r = parse(CSV.as_bytes(), Replay::default()).unwrap();
        let w = with_warm_up(&r, 5.0);
        let arrivals: Vec<f64> = w.iter().map(|q| (q.arrival * 1e3).round() / 1e3).collect();
        assert_eq!(arrivals, [0.0, 0.052, 5.0, 5.052, 15.0]);
        assert_eq!(
            w[2],
            Request {
                arrival: 5.0,
                ..r[0]
            }
        );
        assert!(w.windows(2).all(|p| p[0].arrival <= p[1].arrival));
        assert_eq!(with_warm_up(&r, 0.0), r);
    }

    #[test]
    fn a_bad_row_names_its_line() {
        let e = parse(
            "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,1\n".as_bytes(),
            Replay::default(),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("yesterday"), "{e:#}");
    }
}
