//! The profile's `[api]` table (who may call the HTTP API and how large a body may be) and
//! `[cluster]` table (the cluster file that secures node links).

use std::path::Path;

use serde::Deserialize;

use crate::api::auth::KeySource;
use crate::api::gate::DEFAULT_MAX_BODY_BYTES;

/// How the API admits requests, as the profile (and `serve` flags) say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiAccess {
    /// API keys: `api.keys_file` (relative to the profile's folder), plus `serve --api-key`.
    pub keys: KeySource,
    /// `/metrics` answers without a key (`api.open_metrics`).
    pub open_metrics: bool,
    /// Largest request body in bytes (`api.max_body_bytes`); larger ones get 413.
    pub max_body_bytes: usize,
}

impl Default for ApiAccess {
    fn default() -> Self {
        ApiAccess {
            keys: KeySource::default(),
            open_metrics: false,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// `[api]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApi {
    keys_file: Option<std::path::PathBuf>,
    #[serde(default)]
    open_metrics: bool,
    max_body_bytes: Option<usize>,
}

impl RawApi {
    /// Typed values; a relative keys file is taken from the profile's folder.
    pub(super) fn validate(self, profile: &Path) -> Result<ApiAccess, String> {
        let max_body_bytes = self.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes < 1024 {
            return Err(format!(
                "api.max_body_bytes = {max_body_bytes} leaves no room for a request (at least 1024)"
            ));
        }
        let file = self.keys_file.map(|f| beside(profile, f));
        Ok(ApiAccess {
            keys: KeySource {
                inline: Vec::new(),
                file,
            },
            open_metrics: self.open_metrics,
            max_body_bytes,
        })
    }
}

/// `[cluster]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    file: Option<std::path::PathBuf>,
}

impl RawCluster {
    /// The cluster file, a relative one taken from the profile's folder.
    pub(super) fn validate(self, profile: &Path) -> Option<std::path::PathBuf> {
        self.file.map(|f| beside(profile, f))
    }
}

/// `file` as the profile names it: a relative path is relative to the profile's folder.
fn beside(profile: &Path, file: std::path::PathBuf) -> std::path::PathBuf {
    match profile.parent() {
        Some(dir) if file.is_relative() => dir.join(file),
        _ => file,
    }
}
