#!/usr/bin/env bash
# The GPU checks and rows of the fast paths, in one go (about 10 minutes on an H100/H200):
#   1. correctness: the half-precision and compile tests, on the GPU;
#   2. timing, minipa vs diffusers in one run: fp16 eager, then fp16 with the UNet compiled (CUDA graphs), 512², 50 steps,
#      and a 4-image batch (unet_512px_b4);
#   3. image differences of bf16 / fp16 from fp32, both libraries.
# A GPU machine here has a CUDA build of torch but no diffusers and no internet, so the oracles' wheels travel along:
#   bash benchmarks/gpu_check.sh --fetch      # here, with internet: pure-Python wheels into benchmarks/wheels/ (git-ignored)
#   bash benchmarks/gpu_check.sh              # there: installs them, runs everything, writes benchmarks/results/
#   DRY_RUN=1 bash benchmarks/gpu_check.sh    # on a CPU: the same steps with tiny weights, to check the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
WHEELS=benchmarks/wheels
OUT=${OUT:-benchmarks/results}

if [ "${1:-}" = "--fetch" ]; then  # --fetch [PYTHON_VERSION of the GPU machine, default 3.11]: the oracles as installed here
    version() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }
    "$PY" -m pip download -q --no-deps -d "$WHEELS" "diffusers==$(version diffusers)" "transformers==$(version transformers)" \
        "huggingface_hub==$(version huggingface_hub)"
    "$PY" -m pip download -q --no-deps -d "$WHEELS" --only-binary=:all: --platform manylinux2014_x86_64 \
        --python-version "${2:-3.11}" "tokenizers==$(version tokenizers)" regex safetensors
    ls "$WHEELS"; exit 0
fi

if [ -n "${DRY_RUN:-}" ]; then
    DEVICE=cpu; SMOKE=--smoke; STEPS=4; PRECISION_STEPS=4; SIZE=64; ROWS=unet_step,end_to_end,unet_64px_b2
else
    DEVICE=cuda; SMOKE=; STEPS=50; PRECISION_STEPS=25; SIZE=512; ROWS=unet_step,end_to_end,unet_512px_b4
    "$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name())'
    "$PY" -c 'import diffusers, transformers' 2>/dev/null || "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH=".:${PYTHONPATH:-}"
fi
mkdir -p "$OUT"

echo "== 1. correctness on $DEVICE: the tiny model, 25 DDIM steps + CFG, against minipa on the CPU in float32"
"$PY" - "$DEVICE" "${DRY_RUN:-}" <<'EOF' | tee "$OUT/gpu_check_correctness.txt"
import sys

import numpy as np

import minipa

device, dry = sys.argv[1], bool(sys.argv[2])
run = dict(prompt="a large red circle on a blue background", num_steps=25, output="np", progress=False)
reference = minipa.load_pipeline()(**run)
for dtype in ("float32", "float16", "bfloat16"):
    for compiled in (False, True) if dtype == ("float32" if dry else "float16") else (False,):  # each compile takes minutes
        out = minipa.load_pipeline(device=device, dtype=dtype, compile=compiled)(**run)
        print(f"{device} {dtype:8s} {'compiled' if compiled else 'eager   '} max |Δ| vs CPU float32: {np.abs(out - reference).max():.1e}")
EOF

echo "== 2. timing: eager, then compiled"
for extra in "" "--compile"; do
    # shellcheck disable=SC2086
    timeout $([ -z "$extra" ] && echo 150 || echo 330) "$PY" benchmarks/bench.py --device "$DEVICE" $SMOKE $extra --steps "$STEPS" --size "$SIZE" --no-fresh \
        --rows "$ROWS" --out "$OUT" | tail -6 || echo "(timed out or failed: $extra)"
done

echo "== 3. image differences from float32"
# shellcheck disable=SC2086
"$PY" benchmarks/bench.py --device "$DEVICE" $SMOKE --precision --steps "$PRECISION_STEPS" --size "$SIZE" --out "$OUT" | tail -6
echo "results in $OUT"
