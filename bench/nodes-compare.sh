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
. "$(dirname "$0")/service-cpu.sh"

for round in $(seq 1 "$ROUNDS"); do
    for nodes in 1 3; do
        pg0=$(pg_cpu); n0=$(nats_cpu)
        result=$("$BENCH" --json fanout "$@" --nodes "$nodes" --store "$STORE" --bus "$BUS" | tail -n 1)
        pg1=$(pg_cpu); n1=$(nats_cpu)
        printf '{"nodes":%d,"round":%d,"pg_cpu_s":%s,"nats_cpu_s":%s,"result":%s}\n' \
            "$nodes" "$round" "$(cpu_diff "$pg0" "$pg1")" "$(cpu_diff "$n0" "$n1")" "$result" >> "$OUT"
    done
done
