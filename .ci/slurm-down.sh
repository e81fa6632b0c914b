#!/usr/bin/env bash
# Stop the single-node SLURM started by .ci/slurm-up.sh: cancel its jobs, then stop slurmd,
# slurmctld and munged by their pid files (slurmctld cannot remove its own pid file in /run).
#   --keep-munge   leave munged running (used by slurm-up.sh when it restarts SLURM)
# Safe to run when nothing is running.
set -uo pipefail
log() { echo "slurm-down: $*" >&2; }
now() { date +%s.%N; }
t0="$(now)"
keep_munge=0
[[ "${1:-}" == "--keep-munge" ]] && keep_munge=1

alive_pid() { [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null; }

if command -v squeue >/dev/null && [[ -f /run/slurmctld.pid ]] && kill -0 "$(cat /run/slurmctld.pid 2>/dev/null)" 2>/dev/null; then
    jobs="$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
    if [[ -n "${jobs// /}" ]]; then
        log "cancelling jobs $jobs"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        for _ in $(seq 50); do
            [[ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ]] && break
            sleep 0.2
        done
    fi
fi

# SIGTERM to all daemons at once (each takes 1-2 s to exit), then wait, then SIGKILL
names=(slurmd slurmctld); pidfiles=(/run/slurmd.pid /run/slurmctld.pid)
if (( ! keep_munge )); then names+=(munged); pidfiles+=(/run/munge/munged.pid); fi
pids=()
for i in "${!pidfiles[@]}"; do
    pid=""
    [[ -f "${pidfiles[$i]}" ]] && pid="$(cat "${pidfiles[$i]}" 2>/dev/null)"
    # a stale pid file may name a reused pid: only signal the daemon it was written for
    if [[ -n "$pid" && "$(cat "/proc/$pid/comm" 2>/dev/null)" != "${names[$i]}" ]]; then pid=""; fi
    pids+=("$pid")
    alive_pid "$pid" && kill -TERM "$pid" 2>/dev/null
done
for _ in $(seq 100); do
    any=0
    for pid in "${pids[@]}"; do alive_pid "$pid" && any=1; done
    (( any )) || break
    sleep 0.1
done
for i in "${!pidfiles[@]}"; do
    pid="${pids[$i]}"
    if alive_pid "$pid"; then
        log "${names[$i]} (pid $pid) ignored SIGTERM for 10 s; killing it"
        kill -KILL "$pid" 2>/dev/null
    elif [[ -n "$pid" ]]; then
        log "stopped ${names[$i]} (pid $pid)"
    fi
    rm -f "${pidfiles[$i]}"
done
log "teardown took $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')s"
