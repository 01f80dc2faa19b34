//! One file from the hub into the cache: what the hub says about it (sha256, size, commit), a
//! download that resumes where it stopped, a progress line, and the sha256 check.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{HubConfig, HubError, RemoteFile, io_err, is_sha256};

/// Connections a download may lose (each resumed where it stopped) before it gives up.
const ATTEMPTS: u32 = 5;

/// What the hub's answer to `HEAD .../resolve/REVISION/FILE` says.
pub(super) struct FileMeta {
    /// `x-linked-etag` (or `etag`) when it is a sha256: what the file's bytes hash to.
    pub sha256: Option<String>,
    /// `x-linked-size` or `content-length`.
    pub size: Option<u64>,
    /// `x-repo-commit`: the commit the revision stands for.
    pub commit: Option<String>,
}

pub(super) fn check_status(url: &str, status: u16) -> Result<(), HubError> {
    let hint = match status {
        200..=399 => return Ok(()),
        401 | 403 => ": a gated or private repository (set HF_TOKEN)",
        404 => ": no such repository, revision or file",
        429 => ": rate limited, try again later",
        _ => "",
    };
    Err(HubError::Status {
        url: url.to_string(),
        status,
        hint,
    })
}

/// Asks the hub about the file at `url` without following its redirect (the headers that matter
/// are on the hub's own answer, not the storage's it redirects to).
pub(super) async fn head(client: &reqwest::Client, url: &str) -> Result<FileMeta, HubError> {
    let resp = client
        .head(url)
        .send()
        .await
        .map_err(|source| HubError::Transport {
            url: url.to_string(),
            source,
        })?;
    check_status(url, resp.status().as_u16())?;
    let h = resp.headers();
    let text = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
    let etag = text("x-linked-etag").or_else(|| text("etag")).map(|e| {
        e.trim_start_matches("W/")
            .trim_matches('"')
            .to_ascii_lowercase()
    });
    Ok(FileMeta {
        sha256: etag.filter(|e| is_sha256(e)),
        size: text("x-linked-size")
            .or_else(|| text("content-length"))
            .and_then(|s| s.parse().ok()),
        commit: text("x-repo-commit").filter(|c| !c.is_empty() && !c.contains(['/', '.'])),
    })
}

/// Puts `file` (at `url`) at `blob`, checked against its sha256, unless `blob` is there already.
/// The bytes go to `blob.incomplete` first; a lost connection resumes from its length (a range
/// request), as does a later run after an interrupted one.
pub(super) async fn fetch(
    cfg: &HubConfig,
    client: &reqwest::Client,
    url: &str,
    file: &RemoteFile,
    blob: &Path,
) -> Result<(), HubError> {
    if blob.is_file() {
        return Ok(());
    }
    let expected = file.sha256.clone().unwrap_or_default();
    if let Some(dir) = blob.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(io_err(dir))?;
    }
    let part = blob.with_extension("incomplete");
    let mut progress = Progress::new(cfg.progress, &file.path, file.size);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match download_once(client, url, &part, &mut progress).await {
            Ok(()) => break,
            Err(e) if attempt < ATTEMPTS && matches!(e, HubError::Transport { .. }) => {
                progress.interrupt(&format!(
                    "connection lost ({e}); resuming (attempt {} of {ATTEMPTS})",
                    attempt + 1
                ));
            }
            Err(e) => return Err(e),
        }
    }
    progress.done();
    let hashed = part.clone();
    let actual = tokio::task::spawn_blocking(move || sha256_of(&hashed))
        .await
        .map_err(|e| HubError::Io {
            path: part.display().to_string(),
            source: std::io::Error::other(e),
        })??;
    if actual != expected {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(HubError::Checksum {
            file: file.path.clone(),
            expected: format!("sha256 {expected} (the hub's)"),
            actual: format!("sha256 {actual}"),
        });
    }
    tokio::fs::rename(&part, blob).await.map_err(io_err(blob))
}

/// One GET of the rest of the file into `part`: a range request from its length, or the whole
/// file when the server ignores ranges. A broken stream is a `Transport` error (resumable).
async fn download_once(
    client: &reqwest::Client,
    url: &str,
    part: &Path,
    progress: &mut Progress,
) -> Result<(), HubError> {
    let have = tokio::fs::metadata(part).await.map_or(0, |m| m.len());
    let mut req = client.get(url);
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let transport = |source| HubError::Transport {
        url: url.to_string(),
        source,
    };
    let resp = req.send().await.map_err(transport)?;
    let status = resp.status().as_u16();
    if status == 416 {
        // Nothing left to send: the part is whole (the size and hash checks tell).
        return Ok(());
    }
    check_status(url, status)?;
    let resumed = status == 206;
    let mut out = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(part)
        .await
        .map_err(io_err(part))?;
    progress.at(if resumed { have } else { 0 });
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                // tokio writes a file on a blocking thread: a write still in flight when `out` is
                // dropped could land after the resumed request's first bytes, and the resume
                // would start from a length that is not yet the file's. Flush first.
                out.flush().await.map_err(io_err(part))?;
                return Err(transport(e));
            }
        };
        out.write_all(&chunk).await.map_err(io_err(part))?;
        progress.add(chunk.len() as u64);
    }
    out.flush().await.map_err(io_err(part))
}

/// The sha256 of a file, in lowercase hex (run on a blocking thread: it reads the whole file).
fn sha256_of(path: &Path) -> Result<String, HubError> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher).map_err(io_err(path))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The download's progress on stderr: one redrawn line on a terminal, else a line per 10%.
pub(super) struct Progress {
    on: bool,
    tty: bool,
    name: String,
    total: u64,
    done: u64,
    started: Instant,
    from: u64,
    last_draw: Instant,
    last_tenth: u64,
}

impl Progress {
    pub(super) fn new(on: bool, name: &str, total: u64) -> Self {
        let now = Instant::now();
        Progress {
            on,
            tty: std::io::stderr().is_terminal(),
            name: name.to_string(),
            total,
            done: 0,
            started: now,
            from: 0,
            last_draw: now,
            last_tenth: 0,
        }
    }

    pub(super) fn at(&mut self, done: u64) {
        self.done = done;
        self.from = done;
        self.started = Instant::now();
    }

    pub(super) fn add(&mut self, n: u64) {
        self.done += n;
        let tenth = (self.done * 10).checked_div(self.total).unwrap_or(0);
        let due = if self.tty {
            self.last_draw.elapsed() >= Duration::from_millis(200)
        } else {
            tenth > self.last_tenth
        };
        if due {
            self.last_tenth = tenth;
            self.last_draw = Instant::now();
            self.draw(
                if self.tty { "\r" } else { "" },
                if self.tty { "" } else { "\n" },
            );
        }
    }

    fn line(&self) -> String {
        let mb = |b: u64| b as f64 / 1e6;
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = mb(self.done - self.from) / secs;
        match (self.done * 100).checked_div(self.total) {
            Some(pct) => format!(
                "{}: {:.1} / {:.1} MB ({pct}%), {rate:.1} MB/s",
                self.name,
                mb(self.done),
                mb(self.total)
            ),
            None => format!("{}: {:.1} MB, {rate:.1} MB/s", self.name, mb(self.done)),
        }
    }

    fn draw(&self, before: &str, after: &str) {
        if self.on {
            eprint!("{before}{}{after}", self.line());
        }
    }

    pub(super) fn interrupt(&self, why: &str) {
        if self.on {
            eprintln!("{}{why}", if self.tty { "\n" } else { "" });
        }
    }

    pub(super) fn done(&self) {
        self.draw(if self.tty { "\r" } else { "" }, "\n");
    }
}
