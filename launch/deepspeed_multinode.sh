#!/usr/bin/env bash
# Multi-node launch through DeepSpeed's launcher (pdsh/ssh to every host of the hostfile).
#
#   bash launch/deepspeed_multinode.sh HOSTFILE [hydra overrides...]
#   e.g. bash launch/deepspeed_multinode.sh hosts.txt model=small deepspeed=zero2 parallel.ep_size=8
#
# Runs the preflight first (every host resolves and answers on the ssh port; set
# PREFLIGHT_ARGS="--ssh" to also test passwordless ssh), so a typo in the hostfile fails here
# instead of as a hung rendezvous. --no_local_rank: Hydra must not receive --local_rank=N
# (the rank is in the LOCAL_RANK environment variable). MASTER_PORT defaults to 29500.
# The interpreter: $PYTHON if set, else the repository's .venv (the README's install, which
# users run without activating it), else python3 on PATH. DeepSpeed's launcher is started
# through that same interpreter, so no activated venv or `deepspeed` script on PATH is needed.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 HOSTFILE [hydra overrides...]" >&2
    exit 2
fi
HOSTFILE=$1; shift
HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE"
if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ -x "$HERE/.venv/bin/python" ]]; then
    PY=$HERE/.venv/bin/python
elif command -v python3 >/dev/null 2>&1; then
    PY=python3
else
    echo "$0: no Python found: set PYTHON=/path/to/venv/bin/python" >&2
    exit 2
fi
"$PY" -m launch.preflight --hostfile "$HOSTFILE" ${PREFLIGHT_ARGS:-}
exec "$PY" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
    --module train "$@"
