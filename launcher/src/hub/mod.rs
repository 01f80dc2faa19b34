//! Models by name from the Hugging Face hub: `exo-router pull org/repo:Q4_K_M`, and `--model
//! org/repo:Q4_K_M` wherever a model path goes.
//!
//! A name is a repository and a quantization tag (`org/repo:TAG`, the file whose name carries the
//! tag) or a repository alone (its `Q4_K_M` file, else its only GGUF file). Files land in the hub's
//! own cache layout, so the `huggingface_hub` tools and exo-router share them:
//! `$HF_HUB_CACHE` (default `$HF_HOME/hub`, `~/.cache/huggingface/hub`) holds
//! `models--ORG--REPO/blobs/SHA256`, `snapshots/COMMIT/FILE` (a link to the blob) and
//! `refs/REVISION` (the commit). A download resumes where an interrupted one stopped (HTTP range
//! requests on `blobs/SHA256.incomplete`) and is checked against the sha256 the hub publishes for
//! the file before it is used. `HF_ENDPOINT` points at another hub (a mirror, or a test server),
//! `HF_TOKEN` authenticates, `HF_HUB_OFFLINE=1` uses the cache only. [`fetch_from_peer`] takes a
//! model from a node of the cluster instead.

mod download;
mod peer;

pub use peer::fetch_from_peer;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The quantization a repository name alone stands for, as llama.cpp's `-hf` picks it.
const DEFAULT_TAG: &str = "Q4_K_M";

/// Why a model could not be had by name.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The hub answered with an error status.
    #[error("{url}: HTTP {status}{hint}")]
    Status {
        /// What was asked.
        url: String,
        /// The status.
        status: u16,
        /// What it likely means.
        hint: &'static str,
    },
    /// The hub could not be reached or the connection broke.
    #[error("{url}: {source}")]
    Transport {
        /// What was asked.
        url: String,
        /// The transport error.
        source: reqwest::Error,
    },
    /// The hub's answer was not what its API returns.
    #[error("{url}: unexpected answer: {detail}")]
    Answer {
        /// What was asked.
        url: String,
        /// What was wrong.
        detail: String,
    },
    /// No GGUF file of the repository matches the name.
    #[error("{repo} has no GGUF file for {wanted}; it has: {available}")]
    NoMatch {
        /// The repository.
        repo: String,
        /// The tag or file asked for.
        wanted: String,
        /// The GGUF files it has.
        available: String,
    },
    /// The file is split in parts, which llama.cpp loads from the first part only when all lie
    /// beside it; exo-router fetches single files.
    #[error("{file} is one of {parts} parts of a split GGUF; pull a single-file quantization")]
    Split {
        /// The first matching part.
        file: String,
        /// How many parts match.
        parts: usize,
    },
    /// The hub published no sha256 for the file, so it could not be checked.
    #[error("the hub gives no sha256 for {file}: refusing an unchecked model")]
    NoChecksum {
        /// The file.
        file: String,
    },
    /// The downloaded bytes are not the file the hub (or the peer) describes.
    #[error("{file}: the bytes have {actual}, expected {expected}; the download was removed")]
    Checksum {
        /// The file.
        file: String,
        /// The hash or fingerprint the source publishes.
        expected: String,
        /// What the bytes came to.
        actual: String,
    },
    /// A peer node could not give its model.
    #[error("peer {addr}: {detail}")]
    Peer {
        /// The peer's RPC address.
        addr: String,
        /// What went wrong.
        detail: String,
    },
    /// The cache could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// `HF_HUB_OFFLINE` is set and the cache does not hold the model.
    #[error("{name} is not in the cache {cache} and HF_HUB_OFFLINE is set")]
    Offline {
        /// The name asked for.
        name: String,
        /// The cache folder.
        cache: String,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A model named by its hub repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubName {
    /// `org/repo`.
    pub repo: String,
    /// What picks the file: a quantization tag, or an exact file name.
    pub pick: Pick,
    /// Branch, tag or commit.
    pub revision: String,
}

/// How a file of a repository is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    /// The GGUF file whose name carries this quantization tag (case-insensitive).
    Tag(String),
    /// This file.
    File(String),
    /// The `Q4_K_M` file, else the repository's only GGUF file.
    Default,
}

impl HubName {
    /// Reads `org/repo` or `org/repo:TAG`; `None` for anything else (a path, say: a repository
    /// name never ends in `.gguf`).
    pub fn parse(name: &str) -> Option<HubName> {
        let (repo, tag) = match name.split_once(':') {
            Some((r, t)) => (r, Some(t)),
            None => (name, None),
        };
        let (org, model) = repo.split_once('/')?;
        let ok = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if !ok(org) || !ok(model) || model.to_ascii_lowercase().ends_with(".gguf") {
            return None;
        }
        let pick = match tag {
            Some(t) if ok(t) => Pick::Tag(t.to_string()),
            Some(_) => return None,
            None => Pick::Default,
        };
        Some(HubName {
            repo: repo.to_string(),
            pick,
            revision: "main".into(),
        })
    }

    fn wanted(&self) -> String {
        match &self.pick {
            Pick::Tag(t) => format!("tag {t}"),
            Pick::File(f) => f.clone(),
            Pick::Default => format!("tag {DEFAULT_TAG} (or a single GGUF file)"),
        }
    }

    /// This repository's folder in the cache.
    fn folder(&self, cache: &Path) -> PathBuf {
        cache.join(format!("models--{}", self.repo.replace('/', "--")))
    }
}

/// Where the hub is and where its files go, from the environment the `huggingface_hub` tools read.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The hub's base URL (`HF_ENDPOINT`, default `https://huggingface.co`).
    pub endpoint: String,
    /// The cache folder (`HF_HUB_CACHE`, `$HF_HOME/hub`, `$XDG_CACHE_HOME/huggingface/hub` or
    /// `~/.cache/huggingface/hub`).
    pub cache: PathBuf,
    /// A token for gated or private repositories (`HF_TOKEN`).
    pub token: Option<String>,
    /// Use the cache only (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Redraw a progress line on stderr while downloading.
    pub progress: bool,
}

impl HubConfig {
    /// The configuration the environment describes.
    pub fn from_env() -> HubConfig {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cache = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| var("HF_HOME").map(|h| Path::new(&h).join("hub")))
            .or_else(|| {
                var("XDG_CACHE_HOME").map(|x| Path::new(&x).join("huggingface").join("hub"))
            })
            .or_else(|| {
                var("HOME").map(|h| Path::new(&h).join(".cache").join("huggingface").join("hub"))
            })
            .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"));
        HubConfig {
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            cache,
            token: var("HF_TOKEN"),
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| v != "0" && v != "false"),
            progress: true,
        }
    }

    fn client(&self, redirects: bool) -> Result<reqwest::Client, HubError> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = &self.token
            && let Ok(v) = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
        {
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .redirect(if redirects {
                reqwest::redirect::Policy::limited(5)
            } else {
                reqwest::redirect::Policy::none()
            })
            .user_agent(concat!("exo-router/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .build()
            .map_err(|source| HubError::Transport {
                url: self.endpoint.clone(),
                source,
            })
    }
}

/// One entry of the hub's file listing (`GET /api/models/REPO/tree/REVISION`).
#[derive(Debug, Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Debug, Deserialize)]
struct Lfs {
    oid: String,
    size: u64,
}

/// A file of a repository, as the hub describes it.
#[derive(Debug, Clone)]
pub(crate) struct RemoteFile {
    pub path: String,
    pub size: u64,
    pub sha256: Option<String>,
}

/// The model `name` stands for: from the cache when it holds it, else pulled from the hub.
pub async fn model_path(cfg: &HubConfig, name: &HubName) -> Result<PathBuf, HubError> {
    if let Some(path) = cached(cfg, name) {
        return Ok(path);
    }
    pull(cfg, name).await
}

/// The cached file `name` stands for, if the cache holds one for its revision.
pub fn cached(cfg: &HubConfig, name: &HubName) -> Option<PathBuf> {
    let folder = name.folder(&cfg.cache);
    let commit = std::fs::read_to_string(folder.join("refs").join(&name.revision)).ok()?;
    let snapshot = folder.join("snapshots").join(commit.trim());
    let files: Vec<String> = std::fs::read_dir(&snapshot)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    // A bare name's file is only known from the cache when it is the Q4_K_M one: "the only GGUF"
    // of a snapshot may just be the one quantization pulled so far.
    let pick = match &name.pick {
        Pick::Default => HubName {
            pick: Pick::Tag(DEFAULT_TAG.into()),
            ..name.clone()
        },
        _ => name.clone(),
    };
    let chosen = choose(&files, &pick).ok()?;
    let path = snapshot.join(chosen);
    path.is_file().then_some(path)
}

/// Asks the hub for the file `name` stands for and downloads it into the cache unless the cache
/// has its blob already; returns the file's path in the cache.
pub async fn pull(cfg: &HubConfig, name: &HubName) -> Result<PathBuf, HubError> {
    if cfg.offline {
        return Err(HubError::Offline {
            name: format!("{}:{}", name.repo, name.wanted()),
            cache: cfg.cache.display().to_string(),
        });
    }
    let client = cfg.client(true)?;
    let listing = list(cfg, &client, name).await?;
    let paths: Vec<String> = listing.iter().map(|f| f.path.clone()).collect();
    let chosen = choose(&paths, name)?;
    if !is_plain_path(&chosen) {
        return Err(HubError::Answer {
            url: cfg.endpoint.clone(),
            detail: format!(
                "the listing names {chosen:?}, which is not a path inside a repository"
            ),
        });
    }
    let listed = listing.into_iter().find(|f| f.path == chosen);
    let url = format!(
        "{}/{}/resolve/{}/{}",
        cfg.endpoint, name.repo, name.revision, chosen
    );
    let meta = download::head(&cfg.client(false)?, &url).await?;
    let sha256 = listed
        .as_ref()
        .and_then(|f| f.sha256.clone())
        .or(meta.sha256)
        .ok_or_else(|| HubError::NoChecksum {
            file: chosen.clone(),
        })?;
    let size = listed.map(|f| f.size).filter(|&s| s > 0).or(meta.size);
    let folder = name.folder(&cfg.cache);
    let blob = folder.join("blobs").join(&sha256);
    let file = RemoteFile {
        path: chosen.clone(),
        size: size.unwrap_or(0),
        sha256: Some(sha256),
    };
    download::fetch(cfg, &client, &url, &file, &blob).await?;
    let commit = meta.commit.unwrap_or_else(|| name.revision.clone());
    link_snapshot(&folder, &commit, &name.revision, &chosen, &blob)
}

/// The repository's files (`GET /api/models/REPO/tree/REVISION`).
async fn list(
    cfg: &HubConfig,
    client: &reqwest::Client,
    name: &HubName,
) -> Result<Vec<RemoteFile>, HubError> {
    let url = format!(
        "{}/api/models/{}/tree/{}?recursive=true",
        cfg.endpoint, name.repo, name.revision
    );
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|source| HubError::Transport {
            url: url.clone(),
            source,
        })?;
    download::check_status(&url, resp.status().as_u16())?;
    let entries: Vec<TreeEntry> = resp.json().await.map_err(|e| HubError::Answer {
        url: url.clone(),
        detail: e.to_string(),
    })?;
    Ok(entries
        .into_iter()
        .filter(|e| e.kind == "file")
        .map(|e| RemoteFile {
            size: e.lfs.as_ref().map_or(e.size, |l| l.size),
            sha256: e.lfs.map(|l| l.oid).filter(|o| is_sha256(o)),
            path: e.path,
        })
        .collect())
}

/// A repository file path that stays inside the snapshot: relative, no `..`, `.` or empty
/// segments, no backslashes (the listing is network input, and the path becomes a file here).
fn is_plain_path(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\\')
        && path
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

pub(crate) fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// The GGUF file among `files` that `name` picks: the exact file, or the one whose name carries
/// the tag as a word (`-Q4_K_M.gguf`, `.Q4_K_M.gguf`); refuses split files and says what there is.
fn choose(files: &[String], name: &HubName) -> Result<String, HubError> {
    let ggufs: Vec<&String> = files
        .iter()
        .filter(|f| f.to_ascii_lowercase().ends_with(".gguf"))
        .collect();
    let matching: Vec<&String> = match &name.pick {
        Pick::File(want) => ggufs.iter().copied().filter(|f| *f == want).collect(),
        Pick::Tag(tag) => ggufs
            .iter()
            .copied()
            .filter(|f| carries_tag(f, tag))
            .collect(),
        Pick::Default => {
            let tagged: Vec<&String> = ggufs
                .iter()
                .copied()
                .filter(|f| carries_tag(f, DEFAULT_TAG))
                .collect();
            if tagged.is_empty() && ggufs.len() == 1 {
                ggufs.clone()
            } else {
                tagged
            }
        }
    };
    match matching.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(HubError::NoMatch {
            repo: name.repo.clone(),
            wanted: name.wanted(),
            available: if ggufs.is_empty() {
                "no GGUF files".into()
            } else {
                ggufs
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        }),
        [first, ..] if first.contains("-of-") => Err(HubError::Split {
            file: (*first).clone(),
            parts: matching.len(),
        }),
        several => Err(HubError::NoMatch {
            repo: name.repo.clone(),
            wanted: format!("{} (several match: name one with --file)", name.wanted()),
            available: several
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Whether file name `file` carries quantization tag `tag` as a word: after the start or `-._/`,
/// before the end or `-.` (so `Q4_K` is not `Q4_K_M`), case-insensitive.
fn carries_tag(file: &str, tag: &str) -> bool {
    let upper = file.to_ascii_uppercase();
    let stem = upper.strip_suffix(".GGUF").unwrap_or(&upper);
    let tag = tag.to_ascii_uppercase();
    stem.match_indices(&tag).any(|(i, _)| {
        let before = stem[..i].chars().next_back();
        let after = stem[i + tag.len()..].chars().next();
        before.is_none_or(|c| "-._/".contains(c)) && after.is_none_or(|c| "-.".contains(c))
    })
}

/// Points `snapshots/COMMIT/FILE` at the blob and `refs/REVISION` at the commit.
fn link_snapshot(
    folder: &Path,
    commit: &str,
    revision: &str,
    file: &str,
    blob: &Path,
) -> Result<PathBuf, HubError> {
    let snapshot = folder.join("snapshots").join(commit).join(file);
    if let Some(dir) = snapshot.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    // Relative, as the hub's own tools write it: snapshots/COMMIT/[dirs/]FILE -> ../../blobs/SHA.
    let depth = file.matches('/').count() + 2;
    let target = Path::new(&"../".repeat(depth)).join("blobs").join(
        blob.file_name()
            .map(PathBuf::from)
            .unwrap_or_else(|| blob.to_path_buf()),
    );
    let _ = std::fs::remove_file(&snapshot);
    make_link(&target, &snapshot).map_err(io_err(&snapshot))?;
    let refs = folder.join("refs");
    std::fs::create_dir_all(&refs).map_err(io_err(&refs))?;
    let r = refs.join(revision);
    std::fs::write(&r, commit).map_err(io_err(&r))?;
    Ok(snapshot)
}

#[cfg(unix)]
fn make_link(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn make_link(target: &Path, link: &Path) -> std::io::Result<()> {
    let from = link.parent().map(|p| p.join(target)).unwrap_or_default();
    std::fs::copy(from, link).map(|_| ())
}

#[cfg(test)]
mod tests;
