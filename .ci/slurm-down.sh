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

stop() {  # stop NAME PIDFILE
    local name="$1" pidfile="$2" pid
    [[ -f "$pidfile" ]] || return 0
    pid="$(cat "$pidfile" 2>/dev/null)"
    if alive_pid "$pid"; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 100); do alive_pid "$pid" || break; sleep 0.1; done
        if alive_pid "$pid"; then
            log "$name (pid $pid) ignored SIGTERM for 10 s; killing it"
            kill -KILL "$pid" 2>/dev/null
        fi
        log "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
}

stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
(( keep_munge )) || stop munged /run/munge/munged.pid
log "teardown took $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')s"
