#!/bin/bash
# The DS on the embedded store, on PostgreSQL, and on PostgreSQL with the
# cluster bus, interleaved, with PostgreSQL's and NATS's CPU read from
# /proc around each run (BENCHMARKS.md, run AC).
#
#   bench/store-compare.sh OUT.jsonl ROUNDS -- fanout --members 200 --duration 5
#
# Needs release binaries (cargo build --release --bins), PostgreSQL on
# 127.0.0.1:5432 (database test, user root, trust) and NATS on
# 127.0.0.1:4222, both on this machine (their CPU is read from /proc).
set -euo pipefail
OUT=$1; ROUNDS=$2; shift 3
BENCH=${CARGO_TARGET_DIR:-target}/release/huddle-bench
PSQL=(psql -h 127.0.0.1 -U root test -q)

. "$(dirname "$0")/service-cpu.sh"

for round in $(seq 1 "$ROUNDS"); do
    for store in embedded postgres postgres+bus; do
        unset HUDDLE_STORE HUDDLE_BUS HUDDLE_BUS_PREFIX
        schema=bench_$(date +%s%N)
        if [ "$store" != embedded ]; then
            "${PSQL[@]}" -c "CREATE SCHEMA $schema"
            export HUDDLE_STORE="postgres://root@127.0.0.1:5432/test?options=-c%20search_path%3D$schema"
        fi
        if [ "$store" = postgres+bus ]; then
            export HUDDLE_BUS=nats://127.0.0.1:4222 HUDDLE_BUS_PREFIX=$schema
        fi
        pg0=$(pg_cpu); n0=$(nats_cpu)
        result=$("$BENCH" --json "$@" | tail -n 1)
        pg1=$(pg_cpu); n1=$(nats_cpu)
        printf '{"store":"%s","round":%d,"pg_cpu_s":%s,"nats_cpu_s":%s,"result":%s}\n' \
            "$store" "$round" "$(cpu_diff "$pg0" "$pg1")" \
            "$(cpu_diff "$n0" "$n1")" "$result" >> "$OUT"
        if [ "$store" != embedded ]; then
            "${PSQL[@]}" -c "DROP SCHEMA $schema CASCADE" 2>/dev/null
        fi
    done
done
