#!/usr/bin/env bash
# The tiny world's gpu preset on a GPU, in one go (not yet run on one: a budget of about 10 minutes is the aim):
#   1. `minipa train --preset gpu --device cuda`: every stage, 4× the UNet's and the adapter's steps (WorldConfig.gpu);
#      interrupted by the time limit, it stops cleanly and the next run of this script continues it (--resume);
#   2. `minipa eval -n 256` of that model (on the CPU cores: evaluation has no device option), Markdown + JSON,
#      into benchmarks/results/tiny_world_gpu.{md,json}: ship it only if it beats weights/tiny on every row.
#   DRY_RUN=1 bash benchmarks/train_world_gpu.sh   # on a CPU: the smoke preset, to check the script
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${OUT:-benchmarks/results}
RUN=${RUN:-runs/gpu}
LIMIT=${LIMIT:-420}  # seconds of training in this call
mkdir -p "$OUT" "$RUN"

if [ -n "${DRY_RUN:-}" ]; then
    DEVICE=cpu; PRESET=smoke; N=4; LIMIT=120
else
    DEVICE=cuda; PRESET=gpu; N=256
    "$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name())'
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH=".:${PYTHONPATH:-}"
fi
RESUME=(); [ -d "$RUN/work" ] && RESUME=(--resume)

echo "== 1. minipa train --preset $PRESET --device $DEVICE (at most $LIMIT s in this call)"
if ! timeout --signal INT "$LIMIT" "$PY" -m minipa.train --preset "$PRESET" --device "$DEVICE" --out "$RUN/out" --work "$RUN/work" \
        --no-progress "${RESUME[@]}" > "$RUN/train.log" 2>&1; then
    tail -3 "$RUN/train.log"; echo "(stopped: run this script again to continue)"; exit 0
fi
tail -20 "$RUN/train.log"

echo "== 2. minipa eval -n $N"
"$PY" -m minipa eval --model "$RUN/out" -n "$N" --json "$OUT/tiny_world_$DEVICE.json" | tee "$OUT/tiny_world_$DEVICE.md"
