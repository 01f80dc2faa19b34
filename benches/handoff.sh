#!/usr/bin/env bash
# The KV hand-off over a real, shaped network (docs/bench.md, "Hand-off over a shaped link").
#
#   sudo benches/handoff.sh            (root: it makes network namespaces; CI and this box are root)
#
# Two network namespaces joined by a veth pair: the prefill node (and the router, and the client)
# in one, the decode node in the other, each node a process with one thread. The link is shaped
# with `tc tbf` in both directions (`netem` is not in this kernel). For each rate in RATES and
# prompt size in WORDS, one streaming chat with two greedy output tokens: the time to the first
# token (TTFT), and the **hand-off stall**, the gap between the first and the second token (the
# cache's export, encoding, wire time and import sit in it), with the prefill and transfer times
# the nodes measured (`/metrics`; the transfer starts with the prompt, its pieces leave as the
# prompt runs). Everything stays on this machine; the namespaces go at the end.
# Beside each measurement, the cost model's prediction (`exo-router plan` on the same profile): the
# router runs with the nodes' measured perf tables (taken from PERF) and the link's TCP goodput,
# measured through the shaped link before the nodes start, so it chooses the pieces it predicts for;
# the predicted stall is the hand-off after token 0 plus one decode step. The nodes compute every
# prompt whole (--no-prefix-reuse), as the profile measured them, and the prompt tokens read from
# the prefill node's metrics are the whole prompt's. The pieces are pinned
# (PIECES, `policy.handoff_pieces`), so measurement and prediction cut the cache alike: left to
# choose, the router picks per request from the live load, and at some sizes two choices are
# within a few ms of each other (PIECES= lets it choose; the prediction then assumes an idle
# cluster).
# Settings (environment): RATES="1gbit 100mbit", WORDS="436 1850 3190" (about 512, 2,048 and
# 3,500 prompt tokens with the chat template), CODEC=none, PIECES=8, EXO_MODEL, PERF=profiles/local.toml (a
# profile whose first node's [nodes.perf] both nodes use: measured with `exo-router profile
# --threads 1` on this machine class).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
model="${EXO_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
rates="${RATES:-1gbit 100mbit}"
words="${WORDS:-436 1850 3190}"
codec="${CODEC:-none}"
perf="${PERF:-$root/profiles/local.toml}"
pieces="${PIECES-8}"
p_ns=exo-hp d_ns=exo-hd
p_ip=10.77.0.1 d_ip=10.77.0.2
work="$(mktemp -d)"

if [ "$(id -u)" != 0 ] || ! ip netns add "$p_ns" 2>/dev/null; then
  echo "handoff.sh: needs root and network namespaces (ip netns); not run" >&2
  exit 2
fi
cleanup() {
  for f in "$work"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  sleep 0.5
  ip netns del "$p_ns" 2>/dev/null || true
  ip netns del "$d_ns" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$d_ns"
ip link add exo-vp type veth peer name exo-vd
ip link set exo-vp netns "$p_ns"
ip link set exo-vd netns "$d_ns"
ip -n "$p_ns" addr add "$p_ip/24" dev exo-vp
ip -n "$d_ns" addr add "$d_ip/24" dev exo-vd
for ns in "$p_ns" "$d_ns"; do ip -n "$ns" link set lo up; done
ip -n "$p_ns" link set exo-vp up
ip -n "$d_ns" link set exo-vd up

[ -f "$model" ] || scripts/fetch-model
cargo build --release -q -p exo-launcher -p exo-benches
bin="$root/target/release/exo-router"

# Starts `exo-router ARGS` in namespace $1 as $2, waits for "listening on".
start() {
  local ns=$1 name=$2; shift 2
  ip netns exec "$ns" "$bin" "$@" >"$work/$name.log" 2>&1 &
  echo $! >"$work/$name.pid"
  for _ in $(seq 1 240); do grep -q "listening on" "$work/$name.log" && return 0; sleep 0.25; done
  echo "$name did not start: $(tail -5 "$work/$name.log")" >&2
  return 1
}
stop() { kill "$(cat "$work/$1.pid")" 2>/dev/null || true; wait "$(cat "$work/$1.pid")" 2>/dev/null || true; rm -f "$work/$1.pid"; }
# A counter or histogram sum from a node's /metrics.
metric() { ip netns exec "$p_ns" curl -s "http://$1/metrics" | awk -v m="$2" '$1 ~ "^"m { s += $NF } END { printf "%.3f", s }'; }

# TCP goodput from the prefill side to the decode side, Gbit/s: $1 bytes through the shaped link.
goodput() {
  ip netns exec "$d_ns" python3 - "$d_ip" <<'PY' &
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 52499))
s.listen(1)
c, _ = s.accept()
while c.recv(1 << 20):
    pass
c.sendall(b"k")
PY
  sleep 0.5
  ip netns exec "$p_ns" python3 - "$d_ip" "$1" <<'PY'
import socket, sys, time
c = socket.create_connection((sys.argv[1], 52499))
n, buf = int(sys.argv[2]), bytes(1 << 20)
start, left = time.perf_counter(), n
while left > 0:
    c.sendall(buf[: min(left, len(buf))])
    left -= len(buf)
c.shutdown(socket.SHUT_WR)
c.recv(1)
print(f"{n * 8 / (time.perf_counter() - start) / 1e9:.4f}")
PY
  wait
}

# The cluster profile: both nodes with PERF's perf table (its codec tables only when CODEC is not
# none, so the router can only choose CODEC), the link at goodput $1 Gbit/s.
write_profile() {
  python3 - "$perf" "$model" "$codec" "$1" "$p_ip" "$d_ip" "$pieces" >"$work/cluster.toml" <<'PY'
import sys, tomllib
src, model, codec, gbit, p_ip, d_ip, pieces = sys.argv[1:]
perf = tomllib.load(open(src, "rb"))["nodes"][0]["perf"]
def toml(v):
    if isinstance(v, str):
        return '"' + v + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml(x) for x in v) + "]"
    return repr(v)
table = [f"{k} = {toml(v)}" for k, v in perf.items() if k != "codecs"]
if codec != "none":
    for name, c in perf.get("codecs", {}).items():
        table += [f"[nodes.perf.codecs.{name}]"] + [f"{k} = {toml(v)}" for k, v in c.items()]
print(f'model = "{model}"\nplacement = "disaggregated"\n[kv]\ncodec = "{codec}"')
print(f'[policy]\nkv_bytes_per_token = {perf["kv_bytes_per_token"]}')
if pieces:
    print(f"handoff_pieces = {pieces}")
print(f'[[links]]\nbetween = ["prefill", "decode"]\nbandwidth_gbit_s = {gbit}\nlatency_ms = 0.05')
for name, ip in (("prefill", p_ip), ("decode", d_ip)):
    print(f'[[nodes]]\nname = "{name}"\naddress = "{ip}:52416"\nrole = "{name}"')
    print("[nodes.perf]\n" + "\n".join(table))
PY
}

# The model's prediction for a $1-token prompt on the profile: pieces, and the stall in ms.
predict() {
  "$bin" plan --profile "$work/cluster.toml" --prompt-tokens "$1" --output-tokens 2 --json |
    jq -r '.candidates[0] | "\(.pieces) \((.handoff_s + .steady_tpot_s) * 1000 | round)"'
}

echo "### hand-off over a veth pair shaped with tc tbf; one thread per node; codec $codec; model $(basename "$model"); perf tables from $(basename "$perf"); pieces ${pieces:-chosen per request}"
echo "| link | goodput (Gbit/s) | prompt tokens | TTFT (ms) | hand-off stall (ms) | predicted stall (ms) | error | pieces | prefill (ms) | transfer, from the prompt's start (ms) | KV MB |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for rate in $rates; do
  for ns_dev in "$p_ns exo-vp" "$d_ns exo-vd"; do
    set -- $ns_dev
    ip netns exec "$1" tc qdisc replace dev "$2" root tbf rate "$rate" burst 256kb latency 100ms
  done
  # About a second of traffic at the shaped rate.
  gbit=$(goodput "$(awk -v r="$rate" 'BEGIN { m = (r ~ /gbit/) ? 1e9 : 1e6; sub(/[a-z]+/, "", r); print int(r * m / 8) }')")
  write_profile "$gbit"
  start "$d_ns" decode node --role decode --model "$model" --threads 1 --slots 2 --no-prefix-reuse \
    --listen "$d_ip:52416" --name decode --metrics-listen "$d_ip:9101"
  start "$p_ns" prefill node --role prefill --model "$model" --threads 1 --slots 2 --no-prefix-reuse \
    --listen "$p_ip:52416" --name prefill --metrics-listen "$p_ip:9100"
  start "$p_ns" router serve --profile "$work/cluster.toml" --listen "$p_ip:52415"
  # Untimed warm-up: connections made, first-use costs paid, and prompts of two lengths so the
  # prefill node's engine has timed batches of both sizes (it sizes its batches from them).
  for warm in 20 300; do
    ip netns exec "$p_ns" target/release/loadgen --url "http://$p_ip:52415" --requests 1 \
      --concurrency 1 --max-tokens 2 --short-words "$warm" >/dev/null
  done
  for w in $words; do
    tokens0=$(metric "$p_ip:9100" exo_prefill_tokens_total)
    pre0=$(metric "$p_ip:9100" exo_prefill_seconds_sum)
    xfer0=$(metric "$p_ip:9100" exo_kv_transfer_seconds_sum)
    bytes0=$(metric "$p_ip:9100" exo_kv_exported_bytes_total)
    out=$(ip netns exec "$p_ns" target/release/loadgen --url "http://$p_ip:52415" --requests 1 \
      --concurrency 1 --max-tokens 2 --temperature 0 --short-words "$w")
    ttft=$(awk -F'|' '/TTFT short/ { gsub(/ /, "", $4); print $4 }' <<<"$out")
    stall=$(awk -F'|' '/TPOT short/ { gsub(/ /, "", $4); print $4 }' <<<"$out")
    tokens=$(awk -v a="$tokens0" -v b="$(metric "$p_ip:9100" exo_prefill_tokens_total)" 'BEGIN { print b - a }')
    pre=$(awk -v a="$pre0" -v b="$(metric "$p_ip:9100" exo_prefill_seconds_sum)" 'BEGIN { printf "%.0f", 1000 * (b - a) }')
    xfer=$(awk -v a="$xfer0" -v b="$(metric "$p_ip:9100" exo_kv_transfer_seconds_sum)" 'BEGIN { printf "%.0f", 1000 * (b - a) }')
    mb=$(awk -v a="$bytes0" -v b="$(metric "$p_ip:9100" exo_kv_exported_bytes_total)" 'BEGIN { printf "%.1f", (b - a) / 1e6 }')
    read -r pieces predicted <<<"$(predict "$tokens")"
    error=$(awk -v m="${stall:-0}" -v p="$predicted" 'BEGIN { if (m > 0) printf "%+.0f%%", 100 * (p - m) / m; else print "-" }')
    echo "| $rate | $gbit | $tokens | $ttft | ${stall:-(one token)} | $predicted | $error | $pieces | $pre | $xfer | $mb |"
  done
  stop router; stop prefill; stop decode
done
