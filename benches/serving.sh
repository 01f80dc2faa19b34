#!/usr/bin/env bash
# Serving benchmarks of docs/bench.md: starts exo-router (release) with a profile on a free port, drives
# it with loadgen, stops it. Usage: benches/serving.sh [scaling|mixed|all] [profile for scaling]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build --release -q -p exo-launcher -p exo-benches
what="${1:-all}"
scaling_profile="${2:-profiles/local.toml}"
port=52477

run() { # profile, loadgen args...
  local profile="$1"; shift
  target/release/exo-router serve --profile "$profile" --listen "127.0.0.1:$port" >/tmp/exo-bench-server.log 2>&1 &
  local pid=$!
  for _ in $(seq 1 120); do grep -q "listening on http" /tmp/exo-bench-server.log && break; sleep 0.5; done
  echo "### $profile: loadgen $*"
  target/release/loadgen --url "http://127.0.0.1:$port" "$@"
  # Engine-level decode throughput: tokens generated / time spent in batched decode steps.
  curl -s "http://127.0.0.1:$port/metrics" | awk '
    /^exo_decode_tokens_total/ { tok += $NF }
    /^exo_decode_step_seconds_sum/ { sec = $NF }
    /^exo_decode_step_seconds_count/ { steps = $NF }
    END { if (sec > 0) printf "engine decode: %d tokens in %d steps, %.1f s of steps: %.1f tok/s, %.1f ms/step\n", tok, steps, sec, tok / sec, 1000 * sec / steps }'
  kill $pid; wait $pid 2>/dev/null || true
  echo
}

if [ "$what" = scaling ] || [ "$what" = all ]; then
  for c in 1 2 4 8; do
    run "$scaling_profile" --concurrency "$c" --requests $((c * 4)) --max-tokens 128 --short-words 40
  done
fi
if [ "$what" = mixed ] || [ "$what" = all ]; then
  for p in profiles/local.toml profiles/local-colocated.toml; do
    run "$p" --concurrency 4 --requests 24 --max-tokens 96 --short-words 40
    run "$p" --concurrency 4 --requests 24 --max-tokens 96 --short-words 40 --long-every 6 --long-words 1000
  done
fi
