#!/usr/bin/env bash
# Issue 20 in one run on a GPU host: the data plane and model (embed_gpu.py: main-process modes with CPU
# and GPU decode, and mode `own`), `clipbeam embed` itself with --device cuda (images/s, GPU
# utilisation, vectors against the CPU pipeline's), then the VQGAN+CLIP loop (generate_speed.py: ours
# against the bare loop) and `clipbeam generate`. About 6 minutes on an H200 host with 16 cores.
#
# On the GPU machine (no PyPI there): first, here, `bash benchmarks/gpu_wheels.sh` fills .whl/; then run
#   bash benchmarks/gpu_check.sh                 with carry [".whl"] and a timeout of about 480 s.
# The tables land in $OUT (or ./gpu-check/). A smoke run on any CPU machine, in a few minutes:
#   SMOKE=1 bash benchmarks/gpu_check.sh
set -uo pipefail
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
PY=python3
export PYTHONPATH=.
if [ -x .venv/bin/python ]; then  # this checkout's own environment (the CPU smoke run)
    PY=.venv/bin/python
elif [ -d .whl ]; then  # the GPU machine: the carried wheels of gpu_wheels.sh
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:.
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
nproc | sed 's/^/host cores: /' | tee -a "$OUT/gpu.txt"

if [ -n "${SMOKE:-}" ]; then
    PLANE=(--model ViT-S-32 --n 64 --batch-size 16 --seconds 3 --procs 2 --modes cpu,own)
    PIPE=(--model ViT-S-32 --n 64 --shard-size 32 --batch-size 16 --procs 2 --gen-size 32 --gen-steps 2
          --gen-prompts 2 --gen-model ViT-S-32)
    SPEED=(--size 32 --cutn 4 --steps 2 --model ViT-S-32)
    LIMITS=(900 900 600)  # a CPU has no deadline to meet; a loaded one is slow
else
    PLANE=(--seconds 30 --modes cpu,gpu,own)
    PIPE=(--n 25600 --gen-size 256 --gen-steps 50 --gen-prompts 8)
    SPEED=(--size 256 --cutn 32 --steps 11 --device cuda --precision fp16)
    LIMITS=(200 300 120)  # seconds per step: the whole run fits one device call with time to spare
fi

status=0
step() {  # name, seconds allowed, command...: runs it, keeps its log, goes on after a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || { echo "!! $name failed or timed out"; status=1; }
}
step embed_plane "${LIMITS[0]}" $PY -u benchmarks/embed_gpu.py "${PLANE[@]}" --out "$OUT/embed_plane.txt"
step pipeline "${LIMITS[1]}" $PY -u benchmarks/gpu_pipeline_check.py "${PIPE[@]}" --out "$OUT/pipeline.txt"
step generate_speed "${LIMITS[2]}" $PY -u benchmarks/generate_speed.py "${SPEED[@]}"
echo "== tables"
cat "$OUT"/embed_plane.txt "$OUT"/pipeline.txt 2>/dev/null
tail -4 "$OUT/generate_speed.log"
exit $status
