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

cpu_ticks() { awk -v f="$2" '{ s = $14 + $15; if (f) s += $16 + $17; print s }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# PostgreSQL: the postmaster with the backends it reaped, plus the live ones.
pg_cpu() {
    local pm total
    pm=$(head -1 /var/run/postgresql/*.pid)
    total=$(cpu_ticks "$pm" 1)
    for p in $(pgrep -P "$pm"); do total=$((total + $(cpu_ticks "$p" 0))); done
    awk -v t="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.3f", t / hz }'
}
nats_cpu() {
    local p; p=$(pgrep -o nats-server)
    awk -v t="$(cpu_ticks "$p" 0)" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.3f", t / hz }'
}

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
            "$store" "$round" "$(awk -v a="$pg0" -v b="$pg1" 'BEGIN { printf "%.3f", b - a }')" \
            "$(awk -v a="$n0" -v b="$n1" 'BEGIN { printf "%.3f", b - a }')" "$result" >> "$OUT"
        if [ "$store" != embedded ]; then
            "${PSQL[@]}" -c "DROP SCHEMA $schema CASCADE" 2>/dev/null
        fi
    done
done
