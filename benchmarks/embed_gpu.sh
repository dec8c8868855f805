#!/usr/bin/env bash
# One GPU run of benchmarks/embed_gpu.py on a machine with torch, torchvision, pillow and numpy but no
# open_clip: installs the wheels carried in .whl/ (open_clip_torch, ftfy, wcwidth, regex, tqdm; fetched
# with `pip download`, see the script's README section) into /tmp/site and runs the benchmark for about
# 5 minutes (5 modes of 45 s, plus starting one decode process per core and loading a model in each),
# writing its table to $OUT/embed_gpu.txt. Run from the repository root.
set -euo pipefail
OUT="${OUT:-.}"
python3 -m pip install --quiet --upgrade --no-index --no-deps --find-links .whl --target /tmp/site \
    open_clip_torch ftfy wcwidth regex tqdm
export PYTHONPATH=/tmp/site:.
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 420 python3 -u benchmarks/embed_gpu.py --seconds "${SECONDS_PER_MODE:-45}" --out "$OUT/embed_gpu.txt" "$@" \
    2>&1 | tee "$OUT/embed_gpu.log"
