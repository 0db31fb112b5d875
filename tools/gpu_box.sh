#!/usr/bin/env bash
# The GPU measurement of issue 14 on a borrowed machine with no network (an H100/H200 whose image has torch,
# transformers, peft, accelerate, pyarrow and pandas, but not trl, datasets, bitsandbytes or liger-kernel).
#
#   bash tools/gpu_box.sh wheels        here, with a package index: the missing wheels into .whl/ (~46 MB, ignored
#                                       by git; carry it: the device tool's `carry: [".whl"]`)
#   bash tools/gpu_box.sh bench [OUT]   there: install .whl/ into a private folder (--no-deps, --no-index: the
#                                       image's torch stays), print the versions, run tools/bench_gpu.py, and leave
#                                       OUT/bench_gpu.json, OUT/measured.yaml (the speeds each case recorded for the
#                                       planner) and OUT/bench-gpu.tgz (every case's summary) — few files, as a
#                                       machine that returns at most 8 wants. OUT defaults to $OUT.
#   bash tools/gpu_box.sh image-check   here (CI): the image's older transformers and huggingface_hub over this
#                                       venv, and both GPU harnesses' CPU checks through them — the GPU run is not
#                                       the first to meet those versions (transformers 5.17 once emptied the bench's
#                                       assistant masks where 5.24 did not).
#
# The wheels are for Python 3.12 on x86-64 Linux (the image's python3); PY_VERSION=3.11 etc. for another.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-.whl}"
IMAGE=(transformers==5.17.0 huggingface_hub==1.33.0)  # as the device README lists the image's
PINS=(trl==1.16.0 datasets==5.2.0 "dill<0.4.2" "multiprocess<0.70.20" bitsandbytes==0.50.2 liger-kernel==0.8.5)

case "${1:-}" in
  wheels)
    mkdir -p "$WHEELS"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
      --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 \
      -d "$WHEELS" "${PINS[@]}"
    du -sh "$WHEELS"; ls "$WHEELS"
    ;;
  bench)
    out="${2:-${OUT:?give OUT, or run where \$OUT is set}}"
    deps="${TMPDIR:-/tmp}/zh-align-gpu-deps"
    ls "$WHEELS"/*.whl >/dev/null || { echo "no wheels in $WHEELS: run 'bash tools/gpu_box.sh wheels' first and carry it" >&2; exit 2; }
    python3 -m pip install --quiet --no-deps --no-index --target "$deps" "$WHEELS"/*.whl
    export PYTHONPATH="$deps:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
      TOKENIZERS_PARALLELISM=false MLFLOW_DISABLE_TELEMETRY=true
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 - <<'EOF'
from importlib import metadata
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
for name in ("transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "liger-kernel", "pyarrow"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "MISSING")
EOF
    mkdir -p "$out"
    status=0
    python3 tools/bench_gpu.py --out outputs/bench-gpu "${@:3}" 2>&1 | tee "$out/bench_gpu.log" || status=$?
    cp outputs/bench-gpu/bench_gpu.json configs/measured.yaml "$out/" 2>/dev/null || true  # the planner's speeds too
    tar czf "$out/bench-gpu.tgz" -C outputs bench-gpu
    exit "$status"
    ;;
  image-check)
    py="${PYTHON:-.venv/bin/python}"
    deps="$(mktemp -d)"; trap 'rm -rf "$deps"' EXIT
    "$py" -m pip install --quiet --no-deps --target "$deps" "${IMAGE[@]}"
    export PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}" MLFLOW_TRACKING_URI="sqlite:///$deps/mlflow.db"
    "$py" -c 'import transformers, huggingface_hub as h; print("image stack: transformers", transformers.__version__, "huggingface_hub", h.__version__)'
    "$py" tools/bench_gpu.py --cpu-check --out "$deps/bench-gpu"
    "$py" tools/gpu_smoke.py --cpu-check --out "$deps/gpu-smoke"
    ;;
  *)
    sed -n 2,16p "$0" >&2; exit 2 ;;
esac
