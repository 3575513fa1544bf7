#!/usr/bin/env bash
# Runs the benchmark suite whose figures docs/BENCHMARKS.md reports, one
# JSON object per line into OUT (default bench-results.jsonl), plus the
# latency CDFs as SVG next to it. Build first:
#   cargo build --release --bins
# Takes about 10 minutes on 2 cores (runs K, L on 2026-11-27). Run it on
# an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-results.jsonl}"
dir="$(dirname "$out")"
b=./target/release/huddle-bench
: > "$out"
run() { echo "== $*" >&2; "$b" --json "$@" >> "$out"; }
run baseline --size 1GiB --connections 200
run media --size 256MiB --downloaders 2
run media --size 1GiB --downloaders 2
run media --size 2GiB --downloaders 1
run --plot "$dir/fanout-200.svg" fanout --members 200 --duration 5
rate=$(tail -n 1 "$out" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["messages_per_sec"] / 2))')
run --plot "$dir/fanout-200-half.svg" fanout --members 200 --duration 5 --rate "$rate"
run fanout --members 10 --duration 5
run fanout --members 1000 --duration 5
rate=$(tail -n 1 "$out" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["messages_per_sec"] / 2))')
run --plot "$dir/fanout-1000-half.svg" fanout --members 1000 --duration 5 --rate "$rate"
run fanout --groups 10 --members 50 --senders 1 --duration 5
run fanout --groups 100 --members 10 --senders 1 --duration 5
run fanout --members 500 --senders 1 --duration 5
# The same shapes at the same deliveries per second (7,000 and 700
# messages a second), beside raw quinn relaying them with a stream per
# message, as posts are: what the many-group shape costs the path itself.
run fanout --groups 10 --members 50 --senders 1 --full 0 --duration 5 --rate 7000 --relay-streams
run fanout --members 500 --senders 1 --full 0 --duration 5 --rate 700 --relay-streams
# Asked for more than this machine carries: what the DS gets out beside
# what raw quinn gets out with a stream per message, and with each frame
# also written durably through the DS's own store and writer (the floor of
# the path: transport and durable write, none of the DS's checks).
run fanout --groups 100 --members 10 --senders 1 --full 0 --duration 5 --rate 45000 --relay-streams
run fanout --groups 100 --members 10 --senders 1 --full 0 --duration 5 --rate 45000 --relay-durable
run fanout --groups 10 --members 50 --senders 1 --full 0 --duration 5 --rate 30000 --relay-durable
# Storage written per message against group size alone: the same low rate
# at 10 and at 1,000 members, one sender, so every message is its own
# commit at both sizes (with two senders, how often their messages share a
# commit depends on the DS's load and swamps the group-size effect).
run fanout --members 10 --senders 1 --rate 10 --duration 20
run fanout --members 1000 --senders 1 --rate 10 --duration 20
run membership --members 1000 --rounds 5
run membership --members 100 --rounds 5
run membership --members 1000 --devices 3 --rounds 5
run link --groups 20
run connections --count 1000
run connections --count 10000
run catchup --messages 10000
run catchup --messages 100000
run crash --kills 20
run abuse --seconds 5
echo "results in $out" >&2
