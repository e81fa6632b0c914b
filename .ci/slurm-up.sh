#!/usr/bin/env bash
# Bring up a single-node SLURM (controller + compute node on 127.0.0.1) on this machine.
#
# For CI and developer machines of this project's kind (Debian, root, no systemd, no DNS):
# installs munge/slurmctld/slurmd/slurm-client with apt-get, writes /etc/slurm/slurm.conf
# from .ci/slurm-conf.sh, starts munged (as the munge user), slurmctld and slurmd directly,
# and checks that `srun hostname` runs.  Idempotent: safe to run twice, does nothing but the
# checks when SLURM is already up.  Stop everything with .ci/slurm-down.sh.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
here="$(cd "$(dirname "$0")" && pwd)"
conf=/etc/slurm/slurm.conf
log() { echo "slurm-up: $*" >&2; }
die() { log "ERROR: $*"; for f in /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log; do
          [[ -f $f ]] && { log "--- last lines of $f"; tail -n 15 "$f" >&2; }; done; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# alive PIDFILE NAME: the pid file names a running process called NAME (pids get reused)
alive() { local pid; pid="$(cat "$1" 2>/dev/null)" && [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null \
          && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]]; }

[[ "$(id -u)" == 0 ]] || die "must run as root (it installs packages and starts daemons)"
t_start="$(now)"

# ---------------------------------------------------------------- 1. packages
t0="$(now)"
pkgs=(munge slurmctld slurmd slurm-client)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} )); then
    log "installing ${missing[*]}"
    if ! timeout 600 apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null >/tmp/slurm-up-apt.log 2>&1; then
        log "apt-get install failed; running apt-get update and retrying"
        timeout 600 apt-get update -q </dev/null >>/tmp/slurm-up-apt.log 2>&1 || true
        timeout 600 apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null >>/tmp/slurm-up-apt.log 2>&1 \
            || { tail -n 20 /tmp/slurm-up-apt.log >&2; die "apt-get install ${missing[*]} failed"; }
    fi
fi
t_install="$(since "$t0")"

# ---------------------------------------------------------------- 2. configuration
t0="$(now)"
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
new_conf="$(mktemp)"
bash "$here/slurm-conf.sh" >"$new_conf"
# ignore the generation-time comment when comparing
if [[ -f $conf ]] && diff -q <(grep -v '^# Generated' "$conf") <(grep -v '^# Generated' "$new_conf") >/dev/null; then
    rm -f "$new_conf"
else
    if alive /run/slurmctld.pid slurmctld || alive /run/slurmd.pid slurmd; then
        log "configuration changed: restarting the SLURM daemons"
        bash "$here/slurm-down.sh" --keep-munge
    fi
    install -m 0644 "$new_conf" "$conf"; rm -f "$new_conf"
fi

# ---------------------------------------------------------------- 3. munge
# munged refuses to run as root; it needs its key and directories owned by munge.
if ! (munge -n </dev/null | unmunge >/dev/null) 2>/dev/null; then
    if [[ ! -s /etc/munge/munge.key ]]; then
        if command -v mungekey >/dev/null; then mungekey --create --force >/dev/null 2>&1 \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge; chmod 0755 /run/munge
    chmod 0400 /etc/munge/munge.key
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid || die "munged did not start"
    for _ in $(seq 50); do (munge -n </dev/null | unmunge >/dev/null) 2>/dev/null && break; sleep 0.1; done
    (munge -n </dev/null | unmunge >/dev/null) 2>/dev/null || die "munge does not work"
fi

# ---------------------------------------------------------------- 4. daemons
ping_ctld() { timeout 5 scontrol ping 2>/dev/null | grep -q "is UP"; }
if ! alive /run/slurmctld.pid slurmctld; then
    rm -f /run/slurmctld.pid
    /usr/sbin/slurmctld || die "slurmctld did not start"
fi
for _ in $(seq 100); do ping_ctld && break; sleep 0.2; done
ping_ctld || die "slurmctld does not answer scontrol ping"
if ! alive /run/slurmd.pid slurmd; then
    rm -f /run/slurmd.pid
    /usr/sbin/slurmd || die "slurmd did not start"
fi
node="$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' "$conf")"
state=""
for i in $(seq 150); do
    state="$(timeout 5 sinfo -h -n "$node" -o %t 2>/dev/null | head -n 1 || true)"
    case "$state" in
        idle*|mix*|alloc*|comp*) break ;;
        drain*|down*|fail*) (( i % 10 == 0 )) && timeout 5 scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.2
done
case "$state" in idle*|mix*|alloc*|comp*) ;; *) die "node $node is '$state', not idle after 30 s" ;; esac
t_daemons="$(since "$t0")"

# ---------------------------------------------------------------- 5. a job runs
t0="$(now)"
out="$(timeout 60 srun -N 1 -n 1 -t 1 hostname 2>&1)" || die "srun hostname failed or timed out: $out"
t_srun="$(since "$t0")"

log "SLURM up: node $node $(sinfo -h -n "$node" -o '%c CPUs %m MB' | head -n 1), srun hostname -> $out"
log "timings: install ${t_install}s, config+daemons up ${t_daemons}s, first srun ${t_srun}s, total $(since "$t_start")s"
