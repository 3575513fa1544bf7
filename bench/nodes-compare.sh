#!/bin/bash
# The fan-out benchmark on one node and on three nodes of a cluster (one
# PostgreSQL database, one NATS server, all on this machine), interleaved,
# with PostgreSQL's and NATS's CPU read from /proc around each run
# (BENCHMARKS.md, run AC).
#
#   bench/nodes-compare.sh OUT.jsonl ROUNDS -- --members 200 --duration 5
set -euo pipefail
OUT=$1; ROUNDS=$2; shift 3
BENCH=${CARGO_TARGET_DIR:-target}/release/huddle-bench
STORE=${HUDDLE_BENCH_STORE:-postgres://root@127.0.0.1:5432/test}
BUS=${HUDDLE_BENCH_BUS:-nats://127.0.0.1:4222}
HZ=$(getconf CLK_TCK)
ticks() { awk -v f="$2" '{ s = $14 + $15; if (f) s += $16 + $17; print s }' "/proc/$1/stat" 2>/dev/null || echo 0; }
pg_cpu() {
    local pm total
    pm=$(head -1 /var/run/postgresql/*.pid)
    total=$(ticks "$pm" 1)
    for p in $(pgrep -P "$pm"); do total=$((total + $(ticks "$p" 0))); done
    awk -v t="$total" -v hz="$HZ" 'BEGIN { printf "%.3f", t / hz }'
}
nats_cpu() { awk -v t="$(ticks "$(pgrep -o nats-server)" 0)" -v hz="$HZ" 'BEGIN { printf "%.3f", t / hz }'; }
diff() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

for round in $(seq 1 "$ROUNDS"); do
    for nodes in 1 3; do
        pg0=$(pg_cpu); n0=$(nats_cpu)
        result=$("$BENCH" --json fanout "$@" --nodes "$nodes" --store "$STORE" --bus "$BUS" | tail -n 1)
        pg1=$(pg_cpu); n1=$(nats_cpu)
        printf '{"nodes":%d,"round":%d,"pg_cpu_s":%s,"nats_cpu_s":%s,"result":%s}\n' \
            "$nodes" "$round" "$(diff "$pg0" "$pg1")" "$(diff "$n0" "$n1")" "$result" >> "$OUT"
    done
done
