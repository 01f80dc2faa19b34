#!/usr/bin/env bash
# Soak benchmark (issue 16; not a test): CONCURRENCY streaming chats back to back for DURATION
# seconds against the local cluster (PROFILE, default profiles/local.toml: one `serve` process with
# its nodes embedded), with keep-alive connections. Prints the resident memory of the serve process
# every 30 s and loadgen's summary, whose errors are split into 429s, other HTTP errors, dropped
# connections and other failures (error events, empty answers).
#
#   benches/soak.sh                          # 64 streams, 600 s
#   DURATION=120 CONCURRENCY=16 benches/soak.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
duration="${DURATION:-600}"
concurrency="${CONCURRENCY:-64}"
profile="${PROFILE:-profiles/local.toml}"
addr="${ADDR:-127.0.0.1:52499}"
work="$(mktemp -d)"
trap 'kill "$(cat "$work/serve.pid" 2>/dev/null)" 2>/dev/null || true' EXIT

[ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ] || scripts/fetch-model
cargo build --release -q -p exo-launcher -p exo-benches
target/release/exo-router serve --profile "$profile" --listen "$addr" >"$work/serve.log" 2>&1 &
echo $! >"$work/serve.pid"
for _ in $(seq 1 240); do grep -q "listening on" "$work/serve.log" && break; sleep 0.5; done
grep -q "listening on" "$work/serve.log" || { cat "$work/serve.log" >&2; exit 1; }
pid=$(cat "$work/serve.pid")

echo "### soak: $concurrency streams for $duration s, $profile, keep-alive, 64 tokens each"
target/release/loadgen --url "http://$addr" --duration "$duration" --concurrency "$concurrency" \
  --keep-alive --max-tokens 64 >"$work/loadgen.txt" 2>"$work/loadgen.err" &
load=$!
echo "| t (s) | serve RSS (MiB) |"
echo "|---|---|"
start=$(date +%s)
while kill -0 "$load" 2>/dev/null; do
  t=$(( $(date +%s) - start ))
  rss=$(ps -o rss= -p "$pid" | awk '{ printf "%.0f", $1 / 1024 }')
  echo "| $t | $rss |"
  for _ in $(seq 1 30); do kill -0 "$load" 2>/dev/null || break; sleep 1; done
done
wait "$load"
cat "$work/loadgen.txt"
echo "first errors (of $(wc -l <"$work/loadgen.err")):"
head -n 5 "$work/loadgen.err"
