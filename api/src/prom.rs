//! Reading a Prometheus text exposition (an engine's or a sidecar's `/metrics`) through
//! `openmetrics-parser`: the one reader behind the sidecar's engine scrape, the load generator's
//! observer, the benches and the tests.

use openmetrics_parser::{MetricsExposition, PrometheusType, PrometheusValue};

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("the metrics text does not parse: {0}")]
pub struct ParseError(pub String);

/// A parsed `/metrics` page.
pub struct Exposition(MetricsExposition<PrometheusType, PrometheusValue>);

/// A histogram summed over its label sets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Cumulative `(upper bound, observations at or below it)`, by bound; `+Inf` last.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    /// Observations at or below `bound` (exactly a bucket's bound).
    pub fn at_most(&self, bound: f64) -> Option<u64> {
        self.buckets.iter().find(|b| b.0 == bound).map(|b| b.1)
    }

    /// The upper bound of the bucket holding quantile `q` (`NaN` without observations).
    pub fn quantile_bound(&self, q: f64) -> f64 {
        let total = self.buckets.last().map_or(0, |b| b.1);
        if total == 0 {
            return f64::NAN;
        }
        self.buckets
            .iter()
            .find(|b| b.1 as f64 >= q * total as f64)
            .map_or(f64::NAN, |b| b.0)
    }
}

/// Prometheus reads sample values with Go's `ParseFloat`, which takes `inf` in any case, and
/// the `prometheus` crate writes an infinite gauge as Rust prints it (`inf`); the parser wants
/// the spec's `+Inf`/`-Inf`. Rewrites such values at the end of a sample line.
fn spell_infinities(text: &str) -> std::borrow::Cow<'_, str> {
    let infinite = |l: &str| {
        let v = l.rsplit(' ').next().unwrap_or("");
        let v = v.strip_prefix(['+', '-']).unwrap_or(v);
        !l.starts_with('#') && v.eq_ignore_ascii_case("inf")
    };
    if !text.lines().any(infinite) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for l in text.lines() {
        match l.rsplit_once(' ') {
            Some((head, v)) if infinite(l) => {
                let sign = if v.starts_with('-') { '-' } else { '+' };
                out.push_str(&format!("{head} {sign}Inf"));
            }
            _ => out.push_str(l),
        }
        out.push('\n');
    }
    out.into()
}

impl Exposition {
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        openmetrics_parser::prometheus::parse_prometheus(&spell_infinities(text))
            .map(Self)
            .map_err(|e| ParseError(format!("{e:?}")))
    }

    fn family(
        &self,
        name: &str,
    ) -> Option<&openmetrics_parser::MetricFamily<PrometheusType, PrometheusValue>> {
        let f = &self.0.families;
        f.get(name)
            .or_else(|| name.strip_suffix("_total").and_then(|n| f.get(n)))
    }

    /// The values of the samples of gauge, counter or untyped family `name` whose labels
    /// include every `(label, value)` of `labels`. Counters match with or without their
    /// `_total` suffix.
    pub fn values<'a>(
        &'a self,
        name: &str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = f64> + 'a {
        self.family(name).into_iter().flat_map(move |f| {
            f.iter_samples()
                .filter(move |s| {
                    labels.is_empty()
                        || s.get_labelset().is_ok_and(|set| {
                            labels
                                .iter()
                                .all(|(k, v)| set.get_label_value(k) == Some(*v))
                        })
                })
                .filter_map(|s| match &s.value {
                    PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n) => Some(n.as_f64()),
                    PrometheusValue::Counter(c) => Some(c.value.as_f64()),
                    _ => None,
                })
        })
    }

    /// Label `label` of family `name`'s samples, read as numbers: what an info metric says in
    /// its labels (vLLM's `cache_config_info{block_size="16",...} 1`). Samples without it, or
    /// with something else than a number there, are skipped.
    pub fn label_values<'a>(
        &'a self,
        name: &str,
        label: &'a str,
    ) -> impl Iterator<Item = f64> + 'a {
        self.family(name).into_iter().flat_map(move |f| {
            f.iter_samples()
                .filter_map(move |s| s.get_labelset().ok()?.get_label_value(label)?.parse().ok())
        })
    }

    /// Sum over every label set; `None` when the family is absent.
    pub fn sum(&self, name: &str) -> Option<f64> {
        self.values(name, &[]).reduce(|a, b| a + b)
    }

    /// Sum over the label sets that include `labels`; `None` when none does.
    pub fn sum_where(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.values(name, labels).reduce(|a, b| a + b)
    }

    /// The largest sample (the fullest of several pools, say).
    pub fn max(&self, name: &str) -> Option<f64> {
        self.values(name, &[]).reduce(f64::max)
    }

    /// Histogram `name` summed over its label sets; `None` when absent or not a histogram.
    pub fn histogram(&self, name: &str) -> Option<Histogram> {
        let mut h = Histogram::default();
        let mut any = false;
        for s in self.family(name)?.iter_samples() {
            let PrometheusValue::Histogram(v) = &s.value else {
                continue;
            };
            any = true;
            h.count += v.count.unwrap_or(0);
            h.sum += v.sum.map_or(0.0, |n| n.as_f64());
            for b in &v.buckets {
                let count = b.count.as_f64().max(0.0) as u64;
                match h.buckets.iter_mut().find(|x| x.0 == b.upper_bound) {
                    Some(x) => x.1 += count,
                    None => h.buckets.push((b.upper_bound, count)),
                }
            }
        }
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        any.then_some(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP redline_sidecar_guard_actions_total Guard actions.
# TYPE redline_sidecar_guard_actions_total counter
redline_sidecar_guard_actions_total{direction=\"down\",reason=\"forecast\"} 3
redline_sidecar_guard_actions_total{direction=\"down\",reason=\"preemption\"} 2
redline_sidecar_guard_actions_total{direction=\"up\",reason=\"calm\"} 7
# TYPE redline_sidecar_guard_reaction_seconds histogram
redline_sidecar_guard_reaction_seconds_bucket{le=\"0.5\"} 3
redline_sidecar_guard_reaction_seconds_bucket{le=\"1\"} 4
redline_sidecar_guard_reaction_seconds_bucket{le=\"+Inf\"} 5
redline_sidecar_guard_reaction_seconds_sum 1.9
redline_sidecar_guard_reaction_seconds_count 5
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 2
vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 5
";

    #[test]
    fn sums_filters_and_histograms() {
        let e = Exposition::parse(TEXT).unwrap();
        let actions = "redline_sidecar_guard_actions_total";
        assert_eq!(e.sum(actions), Some(12.0));
        assert_eq!(e.sum_where(actions, &[("direction", "down")]), Some(5.0));
        assert_eq!(
            e.sum_where(actions, &[("direction", "down"), ("reason", "forecast")]),
            Some(3.0)
        );
        assert_eq!(e.sum_where(actions, &[("direction", "sideways")]), None);
        assert_eq!(e.max("vllm:num_requests_running"), Some(5.0));
        assert_eq!(e.sum("vllm:num_requests_running"), Some(7.0));
        assert_eq!(e.sum("absent"), None);
        let h = e
            .histogram("redline_sidecar_guard_reaction_seconds")
            .unwrap();
        assert_eq!(
            (h.count, h.at_most(1.0), h.at_most(0.7)),
            (5, Some(4), None)
        );
        assert!((h.sum - 1.9).abs() < 1e-12);
        assert_eq!(h.quantile_bound(0.5), 0.5);
        assert_eq!(h.quantile_bound(0.8), 1.0);
        assert_eq!(h.quantile_bound(1.0), f64::INFINITY);
        assert!(e.histogram("vllm:num_requests_running").is_none());
    }

    #[test]
    fn infinite_values_as_the_prometheus_crate_writes_them() {
        let text =
            "# TYPE a gauge\na inf\n# TYPE b gauge\nb{x=\"1\"} -inf\n# TYPE c gauge\nc +Inf\n";
        let e = Exposition::parse(text).unwrap();
        assert_eq!(e.sum("a"), Some(f64::INFINITY));
        assert_eq!(e.sum("b"), Some(f64::NEG_INFINITY));
        assert_eq!(e.sum("c"), Some(f64::INFINITY));
    }

    #[test]
    fn garbage_is_a_parse_error() {
        assert!(Exposition::parse("this is { not metrics").is_err());
    }
}
