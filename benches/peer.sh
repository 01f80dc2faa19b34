#!/usr/bin/env bash
# exo-router against llama.cpp itself, side by side in one run (docs/bench.md, "Against llama.cpp").
#
#   benches/peer.sh [engine|http|mixed|all]
#
# Fetches llama.cpp's sources from the package registry (the llama-cpp-python sdist vendors a full
# llama.cpp tree), builds llama-batched-bench and llama-server (Release, no curl) into a cache folder
# once, then prints:
#   engine: `enginebench` (this project's engine) against `llama-batched-bench`, same model, threads,
#           context per sequence, flash attention and KV layout, at each stream count: tok/s and ratio;
#   http:   the same streaming chats (loadgen, greedy) against `exo-router serve` with
#           profiles/local-colocated.toml and against `llama-server -np 8`;
#   mixed:  3 short streaming chats back to back for MIXED_SECS (30), without and then with a
#           ~1,500-token prompt (LONG_WORDS=1360 words) every LONG_PERIOD (5) seconds, against
#           `llama-server -np 8` (THREADS) and `exo-router serve` with profiles/local.toml (split:
#           the cores shared out between its two nodes) and profiles/local-colocated.toml (all cores).
# Settings (environment): THREADS (default: all cores), NPP=128, NTG=128, NPL=1,2,4,8,16,
# CTX_SEQ=2048, FA=off|on, KVU=off|on, ROUNDS=3 (engine runs alternate, best of each), PEER_CACHE (default ~/.cache/exo-router/peer),
# PEER_VERSION (llama-cpp-python version, default 0.3.36).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
what="${1:-all}"
threads="${THREADS:-$(nproc)}"
npp="${NPP:-128}" ntg="${NTG:-128}" npl="${NPL:-1,2,4,8,16}" ctx_seq="${CTX_SEQ:-2048}"
fa="${FA:-off}" kvu="${KVU:-off}" rounds="${ROUNDS:-3}"
version="${PEER_VERSION:-0.3.36}"
cache="${PEER_CACHE:-$HOME/.cache/exo-router/peer}"
model="${EXO_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
src="$cache/llama_cpp_python-$version/vendor/llama.cpp"
build="$cache/build-$version"
bench_bin="$build/bin/llama-batched-bench"
server_bin="$build/bin/llama-server"

fetch_and_build_peer() {
  if [ -x "$bench_bin" ] && [ -x "$server_bin" ]; then return; fi
  mkdir -p "$cache"
  if [ ! -d "$src" ]; then
    echo "fetching llama-cpp-python==$version (sdist) from the package registry..."
    python3 -m pip download --quiet --no-deps --no-binary :all: --disable-pip-version-check \
      "llama-cpp-python==$version" -d "$cache"
    tar -xzf "$cache/llama_cpp_python-$version.tar.gz" -C "$cache"
  fi
  echo "building llama-batched-bench and llama-server (Release, no curl) into $build..."
  cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >"$build.log" 2>&1
  cmake --build "$build" -j "$(nproc)" --target llama-batched-bench llama-server >>"$build.log" 2>&1
}

# The ggml version each side builds (neither tree carries a git commit).
ggml_version() {
  awk '/set\(GGML_VERSION_(MAJOR|MINOR|PATCH) / { gsub(/\)/, "", $2); v = v (v ? "." : "") $2 } END { print v }' "$1/ggml/CMakeLists.txt"
}

versions() {
  local ours
  ours="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-*/llama.cpp 2>/dev/null | sort -V | tail -1)"
  echo "llama.cpp versions: peer = llama-cpp-python $version's vendor/llama.cpp (ggml $(ggml_version "$src")); exo-router = $(basename "$(dirname "$ours")")'s llama.cpp (ggml $(ggml_version "$ours"))"
}

engine() {
  local slots c
  slots="$(tr ',' '\n' <<<"$npl" | sort -n | tail -1)"
  c=$((ctx_seq * slots))
  local peer_flags=(-m "$model" -c "$c" -b 512 -ub 512 -npp "$npp" -ntg "$ntg" -npl "$npl" -t "$threads" -tb "$threads" -fa "$fa" --output-format jsonl)
  local ours_flags=(--model "$model" --npp "$npp" --ntg "$ntg" --npl "$npl" --threads "$threads" --ctx-seq "$ctx_seq" --batch 512 --jsonl)
  [ "$fa" = on ] && ours_flags+=(--flash-attn)
  if [ "$kvu" = on ]; then peer_flags+=(-kvu); ours_flags+=(--kv-unified); else peer_flags+=(-no-kvu); fi
  echo "### engine: $npp-token prompts, $ntg tokens per stream, $threads threads, n_ctx per sequence $ctx_seq, flash attention $fa, unified KV $kvu, best of $rounds alternating rounds"
  local out=/tmp/exo-peer-engine
  rm -f "$out".*.jsonl
  for r in $(seq 1 "$rounds"); do
    "$bench_bin" "${peer_flags[@]}" 2>/dev/null | grep '^{' >>"$out.peer.jsonl"
    target/release/enginebench --raw "${ours_flags[@]}" >>"$out.raw.jsonl"
    target/release/enginebench "${ours_flags[@]}" >>"$out.engine.jsonl"
  done
  python3 - "$out" <<'PY'
import json, sys
def best(side, key):
    rows = {}
    for r in map(json.loads, open(f"{sys.argv[1]}.{side}.jsonl")):
        rows[r["pl"]] = max(rows.get(r["pl"], 0.0), r[key])
    return rows
for key, what in (("speed_tg", "decode"), ("speed_pp", "prefill")):
    peer, raw, eng = best("peer", key), best("raw", key), best("engine", key)
    print(f"{what} tok/s: llama-batched-bench | llama.cpp in exo-router's build (enginebench --raw) | exo-router engine")
    print("| streams | llama-batched-bench | exo build, raw | exo engine | engine / batched-bench | engine / raw |")
    print("|---|---|---|---|---|---|")
    for pl in sorted(eng):
        p = peer.get(pl)
        ratio = f"{eng[pl] / p:.2f}" if p else "(not run)"
        print(f"| {pl} | {p or 0:.1f} | {raw[pl]:.1f} | {eng[pl]:.1f} | {ratio} | {eng[pl] / raw[pl]:.2f} |")
    print()
short = [f"{r['pl']}: {r['generated']}" for r in map(json.loads, open(f"{sys.argv[1]}.engine.jsonl"))
         if r["generated"] < r["pl"] * r["tg"]]
if short:
    print("engine runs that ended early (end of text), tokens generated:", ", ".join(short))
PY
  echo
}

wait_for() { # url, log
  for _ in $(seq 1 240); do
    curl -sf "$1" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "server did not come up; log: $2" >&2
  return 1
}

# Drives a server already starting (pid $2, log $3) at $4 with loadgen at concurrency 1 and 8,
# then stops it. $1 names it in the output.
drive() {
  local name=$1 pid=$2 log=$3 url=$4
  wait_for "$url/v1/models" "$log"
  for c in 1 8; do
    echo "$name, concurrency $c:"
    target/release/loadgen --url "$url" --concurrency "$c" --requests $((c * 4)) \
      --max-tokens "$ntg" --temperature 0 --short-words 40
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

http() {
  local port_peer=52481 port_ours=52482
  echo "### http: streaming chats, 40-word prompts, $ntg greedy tokens; llama-server -np 8 vs exo-router (profiles/local-colocated.toml, 8 slots)"
  "$server_bin" -m "$model" --host 127.0.0.1 --port "$port_peer" -np 8 -c $((8 * 4096)) -t "$threads" -tb "$threads" \
    -fa "$fa" "$([ "$kvu" = on ] && echo -kvu || echo -no-kvu)" >/tmp/exo-peer-server.log 2>&1 &
  drive llama-server $! /tmp/exo-peer-server.log "http://127.0.0.1:$port_peer"
  # The colocated profile with the same thread budget as llama-server.
  sed "s/^slots = 8$/slots = 8\nthreads = $threads/" profiles/local-colocated.toml >/tmp/exo-peer-profile.toml
  target/release/exo-router serve --profile /tmp/exo-peer-profile.toml \
    --listen "127.0.0.1:$port_ours" >/tmp/exo-peer-exo.log 2>&1 &
  drive exo-router $! /tmp/exo-peer-exo.log "http://127.0.0.1:$port_ours"
}

# Short chats alone, then with long prompts arriving, against a server already starting (pid $2,
# log $3) at $4; then stops it. $1 names it in the output.
drive_mixed() {
  local name=$1 pid=$2 log=$3 url=$4
  local secs="${MIXED_SECS:-30}" period="${LONG_PERIOD:-5}" words="${LONG_WORDS:-1360}"
  wait_for "$url/v1/models" "$log"
  # One request first, so neither side is timed while it warms up.
  target/release/loadgen --url "$url" --concurrency 1 --requests 1 --max-tokens 8 >/dev/null
  for long in none "$period"; do
    echo "$name, 3 chats for $secs s, long prompts: $long"
    local extra=()
    [ "$long" != none ] && extra=(--long-period "$period" --long-words "$words")
    target/release/loadgen --url "$url" --concurrency 3 --duration "$secs" --max-tokens 96 \
      --temperature 0 --short-words 40 "${extra[@]}"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

mixed() {
  local port=52483
  echo "### mixed: 3 short chats (40 words, 96 greedy tokens) back to back; then with a long prompt every ${LONG_PERIOD:-5} s"
  "$server_bin" -m "$model" --host 127.0.0.1 --port "$port" -np 8 -c $((8 * 4096)) -t "$threads" -tb "$threads" \
    -fa "$fa" "$([ "$kvu" = on ] && echo -kvu || echo -no-kvu)" >/tmp/exo-peer-server.log 2>&1 &
  drive_mixed llama-server $! /tmp/exo-peer-server.log "http://127.0.0.1:$port"
  for profile in profiles/local.toml profiles/local-colocated.toml; do
    target/release/exo-router serve --profile "$profile" \
      --listen "127.0.0.1:$port" >/tmp/exo-peer-exo.log 2>&1 &
    drive_mixed "exo-router $(basename "$profile")" $! /tmp/exo-peer-exo.log "http://127.0.0.1:$port"
  done
}

[ -f "$model" ] || scripts/fetch-model
fetch_and_build_peer
cargo build --release -q -p exo-launcher -p exo-benches
versions
case "$what" in
  engine) engine ;;
  http) http ;;
  mixed) mixed ;;
  all) engine; http; mixed ;;
  *) echo "usage: benches/peer.sh [engine|http|mixed|all]" >&2; exit 2 ;;
esac
