//! Bearer keys for the OpenAI API, as vLLM's `--api-key`: with keys set, every `/v1/*` call
//! must carry `Authorization: Bearer <key>`; `/health`, `/ready` and `/metrics` stay open for
//! the kubelet's probes and the sidecar.
//!
//! Keys come from the command line (or `REDLINE_API_KEY`) or from a file of one key per line.
//! The file is read again when it changes, so a Kubernetes Secret mounted as a volume rotates
//! keys without a restart: add the new key beside the old, move the clients, remove the old.
//! Only the keys' SHA-256 digests are kept, and a presented key is compared by its digest, so
//! the comparison's time says nothing about a key's bytes.

use crate::openai::ApiError;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

type KeyDigest = [u8; 32];

fn digest(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

/// The keys of a file: one per line, blank lines and `#` comments skipped, whitespace around
/// a key ignored (a Secret written with `echo` ends in a newline).
fn parse(text: &str) -> Vec<KeyDigest> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(digest)
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("reading the API key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the API key file {0} holds no key (one per line)")]
    Empty(PathBuf),
    #[error("the API key is empty")]
    EmptyKey,
}

/// What identifies a version of the file: a Secret volume's update swaps a symlink, which
/// changes the target's modification time and usually its size.
#[derive(Clone, Copy, PartialEq)]
struct Version {
    modified: Option<SystemTime>,
    len: u64,
}

fn version(path: &Path) -> std::io::Result<Version> {
    let m = std::fs::metadata(path)?;
    Ok(Version {
        modified: m.modified().ok(),
        len: m.len(),
    })
}

struct FileState {
    path: PathBuf,
    version: Version,
    checked: Instant,
    /// Set while the file cannot be read or holds no key: the last good keys stay in force,
    /// and the problem is logged once, not on every request.
    failing: bool,
}

/// The keys in force. Cheap to share: the router holds one behind an `Arc`.
pub struct ApiKeys {
    keys: Mutex<Vec<KeyDigest>>,
    file: Option<Mutex<FileState>>,
}

/// How often a request may look at the file's metadata: a Secret volume is refreshed within
/// about a minute of the Secret's change, so a second more is nothing.
const RECHECK: Duration = Duration::from_secs(1);

impl ApiKeys {
    pub fn fixed(key: &str) -> Result<Self, KeysError> {
        let key = key.trim();
        if key.is_empty() {
            return Err(KeysError::EmptyKey);
        }
        Ok(Self {
            keys: Mutex::new(vec![digest(key)]),
            file: None,
        })
    }

    /// Reads the file now: a missing, unreadable or empty file stops the engine at start with
    /// a clear error rather than leave the API open or shut.
    pub fn from_file(path: &Path) -> Result<Self, KeysError> {
        let read = |e| KeysError::Read {
            path: path.to_path_buf(),
            source: e,
        };
        let v = version(path).map_err(read)?;
        let keys = parse(&std::fs::read_to_string(path).map_err(read)?);
        if keys.is_empty() {
            return Err(KeysError::Empty(path.to_path_buf()));
        }
        Ok(Self {
            keys: Mutex::new(keys),
            file: Some(Mutex::new(FileState {
                path: path.to_path_buf(),
                version: v,
                checked: Instant::now(),
                failing: false,
            })),
        })
    }

    pub fn len(&self) -> usize {
        self.keys.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `presented` is one of the keys, after reading the file again if it changed.
    pub fn accepts(&self, presented: &str) -> bool {
        self.refresh(Instant::now());
        let d = digest(presented);
        self.keys.lock().unwrap().contains(&d)
    }

    fn refresh(&self, now: Instant) {
        let Some(file) = &self.file else { return };
        let mut f = file.lock().unwrap();
        if now.duration_since(f.checked) < RECHECK {
            return;
        }
        f.checked = now;
        let read = version(&f.path).and_then(|v| {
            if v == f.version && !f.failing {
                return Ok(None);
            }
            Ok(Some((v, std::fs::read_to_string(&f.path)?)))
        });
        match read {
            Ok(None) => {}
            Ok(Some((v, text))) => {
                let keys = parse(&text);
                if keys.is_empty() {
                    if !f.failing {
                        tracing::warn!(path = %f.path.display(), "the API key file now holds no key; the previous keys stay in force");
                    }
                    f.failing = true;
                    return;
                }
                tracing::info!(path = %f.path.display(), keys = keys.len(), "API keys read again");
                *self.keys.lock().unwrap() = keys;
                f.version = v;
                f.failing = false;
            }
            Err(e) => {
                if !f.failing {
                    tracing::warn!(path = %f.path.display(), error = %e, "cannot read the API key file; the previous keys stay in force");
                }
                f.failing = true;
            }
        }
    }
}

/// The middleware in front of `/v1/*`: a request without a valid key gets OpenAI's 401
/// (`invalid_api_key`), counted, never logged with what it presented.
pub async fn require(
    State((keys, refused)): State<(Arc<ApiKeys>, prometheus::IntCounter)>,
    req: Request,
    next: Next,
) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match presented {
        Some(k) if keys.accepts(k) => next.run(req).await,
        _ => {
            refused.inc();
            let message = if presented.is_none() {
                "this server requires an API key: send `Authorization: Bearer <key>`"
            } else {
                "incorrect API key provided"
            };
            let mut r = ApiError::invalid(message, None)
                .status(StatusCode::UNAUTHORIZED)
                .with_code("invalid_api_key")
                .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("redline-keys-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("keys");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn a_file_holds_keys_one_per_line_with_comments_and_blank_lines() {
        let p = temp_file("parse", "# rotated 2026-11\n  sk-new \n\nsk-old\n");
        let k = ApiKeys::from_file(&p).unwrap();
        assert_eq!(k.len(), 2);
        assert!(k.accepts("sk-new") && k.accepts("sk-old"));
        assert!(!k.accepts("sk-other") && !k.accepts("") && !k.accepts("# rotated 2026-11"));
    }

    #[test]
    fn a_missing_or_empty_file_or_key_is_refused_at_start() {
        assert!(matches!(
            ApiKeys::from_file(Path::new("/nonexistent/keys")),
            Err(KeysError::Read { .. })
        ));
        let p = temp_file("empty", "\n# nothing\n");
        assert!(matches!(ApiKeys::from_file(&p), Err(KeysError::Empty(_))));
        assert!(matches!(ApiKeys::fixed("  "), Err(KeysError::EmptyKey)));
    }

    #[test]
    fn a_changed_file_rotates_the_keys_and_a_broken_one_keeps_the_last_good_keys() {
        let p = temp_file("rotate", "sk-old\n");
        let k = ApiKeys::from_file(&p).unwrap();
        let t0 = Instant::now();
        std::fs::write(&p, "sk-new\nsk-old\n").unwrap();
        // Within the recheck interval the file is not looked at.
        k.refresh(t0);
        assert!(!k.keys.lock().unwrap().contains(&digest("sk-new")));
        k.refresh(t0 + RECHECK);
        assert_eq!(k.len(), 2);
        std::fs::write(&p, "sk-new\n").unwrap();
        k.refresh(t0 + RECHECK * 2);
        assert!(k.accepts("sk-new") && !k.accepts("sk-old"));
        // Emptied or gone: the last good keys hold (the API neither opens nor shuts).
        std::fs::write(&p, "").unwrap();
        k.refresh(t0 + RECHECK * 3);
        std::fs::remove_file(&p).unwrap();
        k.refresh(t0 + RECHECK * 4);
        assert!(k.keys.lock().unwrap().contains(&digest("sk-new")));
        // Back: read again even if it has the same size and time as before.
        std::fs::write(&p, "sk-3rd\n").unwrap();
        k.refresh(t0 + RECHECK * 5);
        assert!(k.keys.lock().unwrap().contains(&digest("sk-3rd")));
        assert_eq!(k.len(), 1);
    }
}
