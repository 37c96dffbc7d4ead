//! Reading an engine's Prometheus `/metrics` into an [`EngineReading`]. Engine-agnostic:
//! redline-engine's own names first, vLLM's otherwise (a vLLM pod is observed, not steered).

use redline_api::prom::Exposition;
use redline_api::{EngineFlavor, EngineReading, Limits};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScrapeError {
    #[error("the metrics text does not parse: {0}")]
    Parse(String),
    #[error(
        "no KV-cache usage metric (neither redline_engine_kv_cache_usage_ratio nor \
         vllm:kv_cache_usage_perc): is this an inference engine's /metrics?"
    )]
    NotAnEngine,
}

/// vLLM's cache config, an info metric (its values are in the labels).
const CACHE_CONFIG: &str = "vllm:cache_config_info";

pub fn parse(text: &str) -> Result<EngineReading, ScrapeError> {
    let scrape = Exposition::parse(text).map_err(|e| ScrapeError::Parse(e.0))?;
    let (sum, max) = (|n: &str| scrape.sum(n), |n: &str| scrape.max(n));
    let count = |name: &str| sum(name).unwrap_or(0.0).max(0.0) as u64;
    let whole = |name: &str| sum(name).map(|v| v.max(0.0) as u64);
    if let Some(usage) = max("redline_engine_kv_cache_usage_ratio") {
        let itl = scrape.histogram("redline_engine_inter_token_latency_seconds");
        let steps = scrape.histogram("redline_engine_step_duration_seconds");
        let limits = match (
            max("redline_engine_max_num_seqs"),
            max("redline_engine_max_batched_tokens"),
        ) {
            // Zero tokens: the engine is still loading and has no limits yet.
            (Some(s), Some(t)) if t >= 1.0 => Some(Limits {
                max_num_seqs: s as u32,
                max_batched_tokens: t as u32,
            }),
            _ => None,
        };
        return Ok(EngineReading {
            flavor: EngineFlavor::Redline,
            kv_usage_ratio: usage,
            kv_blocks_total: sum("redline_engine_kv_blocks_total").map(|v| v as u64),
            kv_blocks_used: sum("redline_engine_kv_blocks_used").map(|v| v as u64),
            kv_block_size: max("redline_engine_kv_block_size").map(|v| v as u64),
            requests_running: count("redline_engine_requests_running"),
            requests_waiting: count("redline_engine_requests_waiting"),
            preemptions_total: count("redline_engine_preemptions_total"),
            limits,
            prompt_tokens_received_total: whole("redline_engine_prompt_tokens_received_total"),
            generation_tokens_total: whole("redline_engine_generation_tokens_total"),
            waiting_prompt_tokens: whole("redline_engine_waiting_prompt_tokens"),
            draining: sum("redline_engine_draining").map(|v| v > 0.0),
            lame_duck: sum("redline_engine_lame_duck").map(|v| v > 0.0),
            shutting_down: sum("redline_engine_shutting_down").map(|v| v > 0.0),
            requests_late_total: whole("redline_engine_requests_late_total"),
            first_tokens_total: scrape
                .histogram("redline_engine_time_to_first_token_seconds")
                .map(|h| h.count),
            inter_token_seconds_total: itl.as_ref().map(|h| h.sum),
            inter_tokens_total: itl.map(|h| h.count),
            step_seconds_total: steps.as_ref().map(|h| h.sum),
            steps_total: steps.map(|h| h.count),
            kv_blocks_freed_total: whole("redline_engine_kv_blocks_freed_total"),
            max_kv_usage: max("redline_engine_max_kv_usage"),
        });
    }
    // vLLM renamed gpu_cache_usage_perc to kv_cache_usage_perc; accept both.
    let usage = max("vllm:kv_cache_usage_perc")
        .or_else(|| max("vllm:gpu_cache_usage_perc"))
        .ok_or(ScrapeError::NotAnEngine)?;
    let vllm_itl = scrape
        .histogram("vllm:inter_token_latency_seconds")
        .or_else(|| scrape.histogram("vllm:time_per_output_token_seconds"));
    Ok(EngineReading {
        flavor: EngineFlavor::Vllm,
        kv_usage_ratio: usage,
        // Its cache config, as an info metric: the pool's size, for the decode forecast (data-
        // parallel engines: their pools together, as the generated tokens are counted).
        kv_blocks_total: scrape
            .label_values(CACHE_CONFIG, "num_gpu_blocks")
            .reduce(|a, b| a + b)
            .map(|v| v as u64),
        kv_blocks_used: None,
        kv_block_size: scrape
            .label_values(CACHE_CONFIG, "block_size")
            .reduce(f64::max)
            .map(|v| v as u64),
        requests_running: count("vllm:num_requests_running"),
        requests_waiting: count("vllm:num_requests_waiting"),
        preemptions_total: count("vllm:num_preemptions_total").max(count("vllm:num_preemptions")),
        limits: None,
        // vLLM counts prompt tokens when it processes them, not on arrival: under saturation
        // this undercounts demand, and its queue (`requests_waiting`) has to tell the rest.
        prompt_tokens_received_total: whole("vllm:prompt_tokens_total"),
        generation_tokens_total: whole("vllm:generation_tokens_total"),
        waiting_prompt_tokens: None,
        draining: None,
        lame_duck: None,
        shutting_down: None,
        requests_late_total: None,
        first_tokens_total: None,
        // vLLM's name until 0.11 (time per output token), and since.
        inter_token_seconds_total: vllm_itl.as_ref().map(|h| h.sum),
        inter_tokens_total: vllm_itl.map(|h| h.count),
        // vLLM exports no step durations (only with detailed tracing on).
        step_seconds_total: None,
        steps_total: None,
        // vLLM does not count the blocks its finished requests free.
        kv_blocks_freed_total: None,
        max_kv_usage: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_redline_engine_metrics() {
        let text = "\
# HELP redline_engine_kv_cache_usage_ratio KV usage
# TYPE redline_engine_kv_cache_usage_ratio gauge
redline_engine_kv_cache_usage_ratio 0.25
# TYPE redline_engine_kv_blocks_total gauge
redline_engine_kv_blocks_total 128
# TYPE redline_engine_kv_blocks_used gauge
redline_engine_kv_blocks_used 32
# TYPE redline_engine_kv_block_size gauge
redline_engine_kv_block_size 16
# TYPE redline_engine_requests_running gauge
redline_engine_requests_running 3
# TYPE redline_engine_requests_waiting gauge
redline_engine_requests_waiting 7
# TYPE redline_engine_preemptions_total counter
redline_engine_preemptions_total 2
# TYPE redline_engine_max_num_seqs gauge
redline_engine_max_num_seqs 16
# TYPE redline_engine_max_batched_tokens gauge
redline_engine_max_batched_tokens 256
# TYPE redline_engine_prompt_tokens_received_total counter
redline_engine_prompt_tokens_received_total 5000
# TYPE redline_engine_generation_tokens_total counter
redline_engine_generation_tokens_total 700
# TYPE redline_engine_waiting_prompt_tokens gauge
redline_engine_waiting_prompt_tokens 1200
# TYPE redline_engine_draining gauge
redline_engine_draining 1
# TYPE redline_engine_lame_duck gauge
redline_engine_lame_duck 1
# TYPE redline_engine_shutting_down gauge
redline_engine_shutting_down 0
# TYPE redline_engine_requests_late_total counter
redline_engine_requests_late_total 4
# TYPE redline_engine_time_to_first_token_seconds histogram
redline_engine_time_to_first_token_seconds_bucket{le=\"+Inf\"} 90
redline_engine_time_to_first_token_seconds_sum 12.5
redline_engine_time_to_first_token_seconds_count 90
# TYPE redline_engine_inter_token_latency_seconds histogram
redline_engine_inter_token_latency_seconds_bucket{le=\"0.05\"} 380
redline_engine_inter_token_latency_seconds_bucket{le=\"+Inf\"} 400
redline_engine_inter_token_latency_seconds_sum 8
redline_engine_inter_token_latency_seconds_count 400
# TYPE redline_engine_step_duration_seconds histogram
redline_engine_step_duration_seconds_bucket{le=\"+Inf\"} 120
redline_engine_step_duration_seconds_sum 3.5
redline_engine_step_duration_seconds_count 120
# TYPE redline_engine_kv_blocks_freed_total counter
redline_engine_kv_blocks_freed_total 640
# TYPE redline_engine_max_kv_usage gauge
redline_engine_max_kv_usage 0.9
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc 0.25
";
        let r = parse(text).unwrap();
        assert_eq!(r.flavor, EngineFlavor::Redline);
        assert_eq!(r.kv_usage_ratio, 0.25);
        assert_eq!((r.kv_blocks_total, r.kv_blocks_used), (Some(128), Some(32)));
        assert_eq!(r.kv_block_size, Some(16));
        assert_eq!((r.requests_running, r.requests_waiting), (3, 7));
        assert_eq!(r.preemptions_total, 2);
        assert_eq!(r.prompt_tokens_received_total, Some(5000));
        assert_eq!(r.generation_tokens_total, Some(700));
        assert_eq!(r.waiting_prompt_tokens, Some(1200));
        assert_eq!(
            (r.draining, r.lame_duck, r.shutting_down),
            (Some(true), Some(true), Some(false))
        );
        assert_eq!(r.requests_late_total, Some(4));
        assert_eq!(r.first_tokens_total, Some(90));
        assert_eq!(
            (r.inter_token_seconds_total, r.inter_tokens_total),
            (Some(8.0), Some(400))
        );
        assert_eq!(
            (r.step_seconds_total, r.steps_total),
            (Some(3.5), Some(120))
        );
        assert_eq!(r.kv_blocks_freed_total, Some(640));
        assert_eq!(r.max_kv_usage, Some(0.9));
        assert_eq!(
            r.limits,
            Some(Limits {
                max_num_seqs: 16,
                max_batched_tokens: 256
            })
        );
    }

    #[test]
    fn reads_vllm_metrics_with_labels() {
        // As vLLM 0.10 prints them (two data-parallel engines).
        let text = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 4.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="m"} 3.0
vllm:num_preemptions_total{engine="1",model_name="m"} 1.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",gpu_memory_utilization="0.9",num_cpu_blocks="None",num_gpu_blocks="26624"} 1.0
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 100.0
vllm:time_per_output_token_seconds_sum{engine="0",model_name="m"} 1.5
vllm:time_per_output_token_seconds_count{engine="0",model_name="m"} 100.0
vllm:time_per_output_token_seconds_bucket{engine="1",le="+Inf",model_name="m"} 50.0
vllm:time_per_output_token_seconds_sum{engine="1",model_name="m"} 0.5
vllm:time_per_output_token_seconds_count{engine="1",model_name="m"} 50.0
"#;
        let r = parse(text).unwrap();
        assert_eq!(r.flavor, EngineFlavor::Vllm);
        assert_eq!(r.kv_usage_ratio, 0.75);
        assert_eq!((r.requests_running, r.requests_waiting), (6, 1));
        assert_eq!(r.preemptions_total, 4);
        assert_eq!((r.limits, r.requests_late_total), (None, None));
        // The pool in tokens, from the cache config's labels ("None" is no number).
        assert_eq!(
            (r.kv_blocks_total, r.kv_block_size),
            (Some(26624), Some(16))
        );
        // The gaps between tokens, both engines' (its name before 0.11).
        assert_eq!(
            (r.inter_token_seconds_total, r.inter_tokens_total),
            (Some(2.0), Some(150))
        );
        assert_eq!((r.step_seconds_total, r.steps_total), (None, None));
        assert_eq!(r.kv_blocks_freed_total, None);
        assert_eq!(r.max_kv_usage, None);
    }

    #[test]
    fn something_else_is_a_clear_error() {
        let e = parse("# TYPE up gauge\nup 1\n").unwrap_err();
        assert_eq!(e, ScrapeError::NotAnEngine);
    }
}
