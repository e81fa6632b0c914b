#!/usr/bin/env bash
# Install gmp-pipeline with its test extras (and torch) and run the whole test suite.
# As root, a single-node SLURM is brought up first (.ci/slurm-up.sh) so the tests marked
# `slurm` run, and torn down on exit if this script started it.  GMP_NO_SLURM=1 skips that
# (the slurm tests then skip, or fail under CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, pinned: on this machine kind torch==2.13.0 is a CPU build already on disk, while an
# unpinned `torch` would pull a multi-GB CUDA build.  Then the package with the extras the tests
# use (the torch adapter of the store reader, the workflows and their BP baseline, qm9pack for
# the QM9 rebuild test).
python3 -m pip install --quiet "torch==2.13.0"
python3 -m pip install --quiet -e ".[test,train,workflows,qm9]"

if [[ "$(id -u)" == 0 && "${GMP_NO_SLURM:-0}" != 1 ]]; then
    slurm_was_up=0
    if [[ "$(cat "/proc/$(cat /run/slurmctld.pid 2>/dev/null)/comm" 2>/dev/null)" == slurmctld ]]; then
        slurm_was_up=1
    fi
    if (( ! slurm_was_up )); then
        trap 'bash .ci/slurm-down.sh || true' EXIT
    fi
    # a failure here is reported by the slurm tests themselves (they fail under CI=true)
    bash .ci/slurm-up.sh || echo "test.sh: .ci/slurm-up.sh failed; the slurm tests will not run" >&2
else
    echo "test.sh: not root (or GMP_NO_SLURM=1): not starting SLURM; tests marked slurm will skip" >&2
fi

python3 -m pytest -q "$@"
