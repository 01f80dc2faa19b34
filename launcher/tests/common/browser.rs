//! Headless Chromium driven over the DevTools protocol: open a page at a viewport size, wait until
//! a JavaScript condition holds, read values, take screenshots. A page that streams (the chat's
//! answer, the cluster's event stream) never goes idle, so `--dump-dom` and `--screenshot` (which
//! wait for a virtual-time budget) capture it half done; this waits for what the test names.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The browser to drive, if this machine has one.
pub fn find() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok())
}

/// One headless browser with one page; killed when dropped.
pub struct Browser {
    child: Child,
    profile: std::path::PathBuf,
    socket: Socket,
    next_id: u64,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Browser {
    /// Starts `binary` headless and attaches to its first page.
    pub async fn start(binary: &str) -> Browser {
        let profile = std::env::temp_dir().join(format!("exo-chromium-{}", std::process::id()));
        let mut child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                &format!("--user-data-dir={}", profile.display()),
                "about:blank",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let ws = lines
            .find_map(|l| {
                let l = l.ok()?;
                Some(l.split_once("DevTools listening on ")?.1.trim().to_string())
            })
            .expect("chromium printed no DevTools address");
        std::thread::spawn(move || lines.for_each(drop));
        // The page target: http://HOST:PORT/json/list names its websocket.
        let port = ws.trim_start_matches("ws://").split('/').next().unwrap();
        let targets: Value = reqwest::get(format!("http://{port}/json/list"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let page = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .expect("no page target");
        let url = page["webSocketDebuggerUrl"].as_str().unwrap();
        let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Browser {
            child,
            profile,
            socket,
            next_id: 0,
        }
    }

    /// Sends one DevTools command and returns its result (events in between are skipped).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.socket.send(Message::text(msg)).await.unwrap();
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .unwrap()
                .unwrap();
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Opens `url` in a `width` x `height` viewport (`mobile`: a phone's).
    pub async fn open(&mut self, url: &str, (width, height): (u32, u32), mobile: bool) {
        let metrics = json!({
            "width": width, "height": height, "deviceScaleFactor": if mobile { 2 } else { 1 },
            "mobile": mobile,
        });
        self.call("Emulation.setDeviceMetricsOverride", metrics)
            .await;
        self.call("Page.navigate", json!({ "url": url })).await;
    }

    /// The value of a JavaScript expression.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let params = json!({ "expression": expression, "returnByValue": true });
        let r = self.call("Runtime.evaluate", params).await;
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is true, up to `timeout`; panics with `what` when it never is.
    pub async fn wait_for(&mut self, expression: &str, timeout: Duration, what: &str) {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if self.eval(&format!("!!({expression})")).await == json!(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let html = self.eval("document.body.outerHTML").await;
        panic!("{what}: still false after {timeout:?}: {expression}\n{html}");
    }

    /// A PNG of the viewport, written to `path`.
    pub async fn screenshot(&mut self, path: &std::path::Path) {
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
}
