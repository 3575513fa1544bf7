# Sourced by bench/store-compare.sh and bench/nodes-compare.sh: CPU seconds
# used so far by the PostgreSQL and NATS servers on this machine, from /proc.

HZ=$(getconf CLK_TCK)

# Clock ticks of process $1 (with $2 = 1, also of the children it reaped).
cpu_ticks() { awk -v f="$2" '{ s = $14 + $15; if (f) s += $16 + $17; print s }' "/proc/$1/stat" 2>/dev/null || echo 0; }

# PostgreSQL: the postmaster with the backends it reaped, plus the live ones.
pg_cpu() {
    local pm total
    pm=$(head -1 /var/run/postgresql/*.pid)
    total=$(cpu_ticks "$pm" 1)
    for p in $(pgrep -P "$pm"); do total=$((total + $(cpu_ticks "$p" 0))); done
    awk -v t="$total" -v hz="$HZ" 'BEGIN { printf "%.3f", t / hz }'
}

nats_cpu() { awk -v t="$(cpu_ticks "$(pgrep -o nats-server)" 0)" -v hz="$HZ" 'BEGIN { printf "%.3f", t / hz }'; }

# $2 - $1, three decimals.
cpu_diff() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
