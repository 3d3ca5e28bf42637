#!/usr/bin/env bash
# `minipa train-adapter` on a GPU, in one go (about 10 minutes on an H100/H200):
#   1. the train-adapter tests on the GPU (MINIPA_TEST_DEVICE=cuda): one step against diffusers parts in float32, the
#      short run and its adapter in diffusers, --resume, bf16 against fp32, the memory options;
#   2. 200 steps on SD 1.5-sized random weights, 512², batch 8, fp16 then bf16, one process under torchrun (NCCL):
#      seconds per step, images/s, peak memory, appended to benchmarks/results/train_adapter_cuda.jsonl.
# The oracles (diffusers, transformers) are not on a GPU machine here: their wheels travel along, fetched by
#   bash benchmarks/gpu_check.sh --fetch          # here, with internet, into benchmarks/wheels/ (git-ignored: carry it)
#   bash benchmarks/train_adapter_gpu.sh          # there
#   DRY_RUN=1 bash benchmarks/train_adapter_gpu.sh   # on a CPU: the same steps, tiny and short, to check the script
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
WHEELS=benchmarks/wheels
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"

if [ -n "${DRY_RUN:-}" ]; then
    DEVICE=cpu; SIZE=(--tiny); STEPS=3; BATCH=2; PRECISIONS="bf16"; TESTS=(-k "json or preprocessing")
else
    DEVICE=cuda; SIZE=(); STEPS=200; BATCH=8; PRECISIONS="fp16 bf16"; TESTS=()
    "$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name())'
    "$PY" -c 'import diffusers, transformers' 2>/dev/null || "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl \
        || echo "(no diffusers: the parity tests will fail; fetch the wheels first)"
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH=".:${PYTHONPATH:-}"
fi

echo "== 1. the train-adapter tests on $DEVICE"
if "$PY" -c 'import pytest' 2>/dev/null; then
    MINIPA_TEST_DEVICE=$DEVICE timeout 300 "$PY" -m pytest -q -rP tests/test_train_adapter.py -p no:cacheprovider "${TESTS[@]}" \
        2>&1 | grep -E "passed|failed|skipped|Error|largest|within|before →" | tee "$OUT/train_adapter_${DEVICE}_tests.txt" || true
else
    echo "(pytest is not installed: skipped)"
fi

echo "== 2. $STEPS steps, batch $BATCH, one process under torchrun"
for precision in $PRECISIONS; do
    timeout 420 "$PY" -m torch.distributed.run --nproc_per_node 1 benchmarks/train_adapter.py --device "$DEVICE" \
        --precision "$precision" --batch-size "$BATCH" --steps "$STEPS" "${SIZE[@]}" --json "$OUT/train_adapter_$DEVICE.jsonl" \
        2>&1 | tail -1 || echo "(timed out or failed: $precision)"
done
