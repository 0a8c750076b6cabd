#!/usr/bin/env bash
# The GPU figures of the README in one short run (< 8 minutes) on a CUDA machine:
#   1. extract img/s vs the teacher's bare forward with AMP (goal: ratio >= 0.95);
#   2. the cached align step (mobilenetv3_small_100, 224 px, AMP) alone, the loader alone with all but two cores
#      as workers, and the step fed by the loader, from the originals, with draft decoding and from a 256 px view
#      store (goal: the store feeds the step);
#   3. latency of the student (as `cskd export` wraps it) on the GPU, eager fp32 and fp16, batch 1 and 64.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (PHOTOS=... for another photo folder; PYTHON=... for the venv)
# Everything it measures goes to OUT_DIR (default gpu-check/): one markdown file per part and JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
PY=${PYTHON:-python}
PHOTOS=${PHOTOS:-../shared/data/photos}
$PY -c "import torch, cskd_cache" 2>/dev/null || { echo "$PY cannot import torch and cskd_cache: install cskd as the README says, or set PYTHON=/path/to/venv/bin/python" >&2; exit 2; }
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here: gpu_check.sh measures GPU figures only')"
mkdir -p "$OUT"
$PY -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)" | tee "$OUT/device.txt"
WORKERS=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))

echo "== 1. extract vs bare forward (AMP)"
timeout 240 $PY benchmarks/extract_throughput.py --device cuda --images "$PHOTOS/imagenet-sample" --n 800 \
    --batch-size 128 --num-workers "$WORKERS" --repeat 3 --markdown | tee "$OUT/extract.md"

echo "== 2. align step fed from the originals vs the view store"
timeout 240 $PY benchmarks/loader.py --photos "$PHOTOS" --n 800 --wallpapers 0 --sizes 224 --repeat 1 --passes 1 \
    --students "" --device cuda --workers "$WORKERS" --gpu-batch 256 --json "$OUT/loader.json" --markdown \
    | tee "$OUT/loader.md"

echo "== 3. student latency on the GPU"
timeout 90 $PY - <<'PYEOF' | tee "$OUT/latency.md"
import time, torch
from cskd_cache.models.runs import build_encoder
from cskd_cache.models.scorer import IAAModel, build_head
dev = torch.device("cuda")
print("| student | precision | batch | ms/call | img/s |\n|---|---|---|---|---|")
for name in ("mobilenetv3_small_100", "efficientnet_b0", "resnet50"):
    enc = build_encoder(f"timm:{name}", size=224)
    model = IAAModel(enc, build_head("distribution", enc.pooled_dim, 10)).to(dev).eval()
    for prec in ("fp32", "fp16"):
        for b in (1, 64):
            x = torch.randn(b, 3, 224, 224, device=dev)
            ctx = torch.autocast("cuda", dtype=torch.float16) if prec == "fp16" else torch.autocast("cuda", enabled=False)
            with torch.inference_mode(), ctx:
                for _ in range(10):
                    model(x)
                torch.cuda.synchronize()
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < 1.0:
                    model(x); n += 1
                torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) / n * 1e3
            print(f"| {name} | {prec} | {b} | {ms:.2f} | {b / ms * 1e3:,.0f} |")
PYEOF
echo "wrote $OUT/"
