//! API keys: who may call the HTTP API.
//!
//! Keys come from `serve --api-key` / `EXO_API_KEY` (one key, named `cli`) and from a keys file
//! (`[keys]` table of `name = "key"`), which is re-read when it changes so a key can be revoked
//! without a restart. A client presents its key as `Authorization: Bearer KEY` (OpenAI clients) or
//! `x-api-key: KEY` (Anthropic clients). Only SHA-256 digests are kept, and a presented key is
//! compared with every digest in constant time, so neither timing nor memory tells a key apart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use axum::http::HeaderMap;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Shortest key accepted: shorter ones can be guessed by anyone on the LAN.
pub const MIN_KEY_CHARS: usize = 16;
/// How often the keys file is checked for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Why a set of keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The keys file could not be read.
    #[error("cannot read API keys file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The keys file is not a `[keys]` table of `name = "key"` strings.
    #[error("API keys file {path} is invalid: {detail}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// A key is too short or not printable.
    #[error("API key {name:?} is unusable: {why}")]
    Weak {
        /// The key's name.
        name: String,
        /// What is wrong with it.
        why: String,
    },
}

/// Where a router's keys come from. Its `Debug` shows key names, never keys.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KeySource {
    /// Keys given directly (`--api-key`), with their names.
    pub inline: Vec<(String, String)>,
    /// A keys file, re-read when it changes.
    pub file: Option<PathBuf>,
}

impl KeySource {
    /// True when no key is configured: the API is open to whoever reaches it.
    pub fn is_empty(&self) -> bool {
        self.inline.is_empty() && self.file.is_none()
    }
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.inline.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("KeySource")
            .field("inline", &names)
            .field("file", &self.file)
            .finish()
    }
}

/// One accepted key: its name (for logs and metrics) and its digest.
struct Entry {
    name: Arc<str>,
    digest: [u8; 32],
}

/// The keys file: `[keys]` with one `name = "key"` per key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    keys: std::collections::BTreeMap<String, String>,
}

/// The API keys a router accepts; empty means the API is open.
pub struct ApiKeys {
    source: KeySource,
    entries: RwLock<Arc<Vec<Entry>>>,
    file_stamp: RwLock<Option<Stamp>>,
}

impl std::fmt::Debug for ApiKeys {
    /// Names where the keys come from and how many there are; never a key or a digest.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("file", &self.source.file)
            .field("keys", &self.count())
            .finish()
    }
}

/// Why a request was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No key in `Authorization: Bearer` or `x-api-key`.
    Missing,
    /// A key that matches none of the accepted ones.
    Wrong,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn checked(name: &str, key: &str) -> Result<Entry, KeysError> {
    let weak = |why: &str| KeysError::Weak {
        name: name.into(),
        why: why.into(),
    };
    if key.chars().count() < MIN_KEY_CHARS {
        return Err(weak(&format!("shorter than {MIN_KEY_CHARS} characters")));
    }
    if !key.chars().all(|c| c.is_ascii_graphic()) {
        return Err(weak(
            "only printable ASCII without spaces can travel in a header",
        ));
    }
    if name.is_empty() {
        return Err(weak("a key needs a name"));
    }
    Ok(Entry {
        name: name.into(),
        digest: digest(key),
    })
}

/// When a file was last changed, and its length (a rewrite within the clock's granularity still
/// shows as a change when the length differs).
type Stamp = (SystemTime, u64);

fn file_stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn read_file(path: &Path) -> Result<Vec<Entry>, KeysError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
        path: p.clone(),
        source,
    })?;
    let file: KeysFile = toml::from_str(&text).map_err(|e| KeysError::Parse {
        path: p,
        detail: e.to_string(),
    })?;
    file.keys.iter().map(|(n, k)| checked(n, k)).collect()
}

/// Every key `source` names: the inline ones, then the file's.
fn read_all(source: &KeySource) -> Result<Vec<Entry>, KeysError> {
    let mut entries = source
        .inline
        .iter()
        .map(|(n, k)| checked(n, k))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(path) = &source.file {
        entries.extend(read_file(path)?);
    }
    Ok(entries)
}

impl ApiKeys {
    /// No keys: an open API.
    pub fn none() -> ApiKeys {
        ApiKeys {
            source: KeySource::default(),
            entries: RwLock::new(Arc::new(Vec::new())),
            file_stamp: RwLock::new(None),
        }
    }

    /// Loads the keys `source` names; an unusable key or file is an error.
    pub fn load(source: KeySource) -> Result<ApiKeys, KeysError> {
        let stamp = source.file.as_deref().and_then(file_stamp);
        let entries = read_all(&source)?;
        Ok(ApiKeys {
            source,
            entries: RwLock::new(Arc::new(entries)),
            file_stamp: RwLock::new(stamp),
        })
    }

    /// True when the API asks for a key.
    pub fn required(&self) -> bool {
        !self.source.is_empty()
    }

    /// Keys accepted now.
    pub fn count(&self) -> usize {
        self.entries.read().map_or(0, |e| e.len())
    }

    /// Checks a request's headers; returns the name of the key it presented.
    pub fn check(&self, headers: &HeaderMap) -> Result<Arc<str>, Denied> {
        let presented = presented_key(headers).ok_or(Denied::Missing)?;
        let wanted = digest(presented);
        let entries = self
            .entries
            .read()
            .map(|e| Arc::clone(&e))
            .unwrap_or_default();
        // Every digest is compared, match or not: the time taken does not say which key matched.
        let mut found = None;
        for e in entries.iter() {
            if bool::from(e.digest.ct_eq(&wanted)) {
                found = Some(Arc::clone(&e.name));
            }
        }
        found.ok_or(Denied::Wrong)
    }

    /// Re-reads the keys file if it changed since it was last read. A file that became unreadable
    /// or invalid leaves the keys as they were (logged as an error): a typo while revoking one
    /// key must not open the API or lock everyone out.
    pub fn reload_if_changed(&self) {
        let Some(path) = &self.source.file else {
            return;
        };
        let stamp = file_stamp(path);
        if self.file_stamp.read().is_ok_and(|s| *s == stamp) {
            return;
        }
        if let Ok(mut s) = self.file_stamp.write() {
            *s = stamp;
        }
        let entries = match read_all(&self.source) {
            Ok(e) => e,
            Err(e) => {
                return tracing::error!(error = %e, "API keys file not reloaded; the keys read before stay in force");
            }
        };
        tracing::info!(path = %path.display(), keys = entries.len(), "API keys reloaded");
        if let Ok(mut current) = self.entries.write() {
            *current = Arc::new(entries);
        }
    }

    /// Checks the keys file every [`RELOAD_EVERY`] for as long as the task runs.
    pub async fn watch(self: Arc<Self>) {
        if self.source.file.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(RELOAD_EVERY);
        loop {
            tick.tick().await;
            let keys = Arc::clone(&self);
            // File I/O and hashing run on a blocking thread, not the async workers.
            let _ = tokio::task::spawn_blocking(move || keys.reload_if_changed()).await;
        }
    }
}

/// The key a request presents: `Authorization: Bearer KEY`, else `x-api-key: KEY`.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, key) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        });
    bearer
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .filter(|k| !k.is_empty())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use axum::http::HeaderValue;

    fn headers(name: &str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
        h
    }

    fn inline(keys: &[(&str, &str)]) -> KeySource {
        KeySource {
            inline: keys
                .iter()
                .map(|(n, k)| (n.to_string(), k.to_string()))
                .collect(),
            file: None,
        }
    }

    #[test]
    fn bearer_and_x_api_key_are_accepted_and_name_the_key() {
        let keys = ApiKeys::load(inline(&[
            ("alice", "alice-key-0123456789"),
            ("bob", "bob-key-0123456789ab"),
        ]))
        .unwrap();
        let h = headers("authorization", "Bearer bob-key-0123456789ab");
        assert_eq!(&*keys.check(&h).unwrap(), "bob");
        let h = headers("x-api-key", "alice-key-0123456789");
        assert_eq!(&*keys.check(&h).unwrap(), "alice");
        let h = headers("authorization", "bearer  alice-key-0123456789 ");
        assert_eq!(&*keys.check(&h).unwrap(), "alice");
    }

    #[test]
    fn missing_wrong_and_prefix_keys_are_refused() {
        let keys = ApiKeys::load(inline(&[("alice", "alice-key-0123456789")])).unwrap();
        assert_eq!(keys.check(&HeaderMap::new()).err(), Some(Denied::Missing));
        for wrong in [
            "Bearer alice-key-012345678",
            "Bearer alice-key-01234567890",
            "Basic alice-key-0123456789",
            "alice-key-0123456789",
            "Bearer ",
        ] {
            let got = keys.check(&headers("authorization", wrong));
            assert!(got.is_err(), "{wrong}");
        }
    }

    #[test]
    fn short_or_unprintable_keys_are_refused_at_load() {
        assert!(matches!(
            ApiKeys::load(inline(&[("a", "short")])),
            Err(KeysError::Weak { .. })
        ));
        assert!(matches!(
            ApiKeys::load(inline(&[("a", "has a space in it 0123")])),
            Err(KeysError::Weak { .. })
        ));
    }

    #[test]
    fn a_key_deleted_from_the_file_is_revoked_and_a_broken_file_keeps_the_old_keys() {
        let dir = std::env::temp_dir().join(format!("exo-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        std::fs::write(
            &path,
            "[keys]\nalice = \"alice-key-0123456789\"\nbob = \"bob-key-0123456789ab\"\n",
        )
        .unwrap();
        let keys = ApiKeys::load(KeySource {
            inline: Vec::new(),
            file: Some(path.clone()),
        })
        .unwrap();
        assert_eq!(keys.count(), 2);
        let bob = headers("x-api-key", "bob-key-0123456789ab");
        assert!(keys.check(&bob).is_ok());
        // Rewrite without bob; the stamp must differ, so force one.
        std::fs::write(&path, "[keys]\nalice = \"alice-key-0123456789\"\n").unwrap();
        *keys.file_stamp.write().unwrap() = None;
        keys.reload_if_changed();
        assert_eq!(keys.check(&bob).err(), Some(Denied::Wrong));
        std::fs::write(&path, "[keys\n").unwrap();
        *keys.file_stamp.write().unwrap() = None;
        keys.reload_if_changed();
        assert_eq!(keys.count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
