//! Real processes for the multi-process tests: `exo-router` nodes and routers started on free
//! loopback ports and killed when dropped.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// Kills the process when dropped, so a failing test leaves nothing running.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `exo-router ARGS` and returns it with the first stdout line containing `marker`.
pub fn spawn(args: &[&str], marker: &str) -> (Proc, String) {
    spawn_logged(args, marker, Stdio::inherit())
}

/// [`spawn`] with the process's stderr going to `stderr`.
pub fn spawn_logged(args: &[&str], marker: &str, stderr: Stdio) -> (Proc, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_exo-router"));
    cmd.args(args).stderr(stderr);
    spawn_command(cmd, marker)
}

/// Starts `cmd` (quiet logs, stdout piped) and returns it with its first stdout line containing
/// `marker`. `EXO_TEST_LOG` sets the processes' `RUST_LOG` (e.g. `info` to follow a request id
/// through every process of a failing test); warnings only by default.
pub fn spawn_command(cmd: Command, marker: &str) -> (Proc, String) {
    let (proc, mut lines) = spawn_command_lines(cmd, marker, 1);
    (proc, lines.remove(0))
}

/// [`spawn_command`] that waits for the first `n` stdout lines containing `marker`.
pub fn spawn_command_lines(mut cmd: Command, marker: &str, n: usize) -> (Proc, Vec<String>) {
    let log = std::env::var("EXO_TEST_LOG").unwrap_or_else(|_| "warn".into());
    let mut child = cmd
        .env("RUST_LOG", log)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let proc = Proc(child);
    let mut lines = BufReader::new(stdout).lines();
    let found: Vec<String> = lines
        .by_ref()
        .map_while(Result::ok)
        .filter(|l| l.contains(marker))
        .take(n)
        .collect();
    assert_eq!(
        found.len(),
        n,
        "{n} {marker:?} lines from {cmd:?}: {found:?}"
    );
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (proc, found)
}

/// Runs `ip ARGS` (network namespaces and links); true if it succeeded.
pub fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn last_word(line: &str) -> String {
    line.split_whitespace()
        .last()
        .unwrap()
        .trim_start_matches("http://")
        .to_string()
}

/// Starts `exo-router node` for `role` as `name` on a free port with `extra` flags; returns the
/// process and its RPC address.
pub fn spawn_node(model: &str, role: &str, name: &str, extra: &[&str]) -> (Proc, String) {
    spawn_node_logged(model, role, name, extra, Stdio::inherit())
}

/// [`spawn_node`] with the node's stderr going to `stderr`.
pub fn spawn_node_logged(
    model: &str,
    role: &str,
    name: &str,
    extra: &[&str],
    stderr: Stdio,
) -> (Proc, String) {
    let mut args = node_args(model, role, name);
    args.extend_from_slice(&["--listen", "127.0.0.1:0"]);
    args.extend_from_slice(extra);
    let (proc, line) = spawn_logged(&args, "listening on", stderr);
    (proc, last_word(&line))
}

/// The arguments of a test's `exo-router node` as `name`, before its listen address and flags.
pub fn node_args<'a>(model: &'a str, role: &'a str, name: &'a str) -> Vec<&'a str> {
    vec![
        "node",
        "--role",
        role,
        "--name",
        name,
        "--model",
        model,
        // Test nodes stay off the LAN: a router that browses it (the discovery test, another
        // copy of the suite) must not find them.
        "--no-announce",
    ]
}

/// A free loopback address for a metrics listener.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// The Prometheus page at `http://addr/metrics`.
pub async fn metrics(addr: &str) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
