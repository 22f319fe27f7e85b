#!/usr/bin/env bash
# The GPU checks of issues 2 and 7 as one prepared command for a lent device machine (one CUDA GPU, no network).
# Prepare here: bash scripts/gpu/fetch_wheels.sh. Device call: command "bash scripts/gpu/run_checks.sh",
# carry [".whl"], timeout_s 600. Every step has its own time limit so the whole stays under ~9.5 minutes, and writes
# into $OUT (at most 8 files come back): env.txt, pytest_gpu.log, diffusion.md, core_losses.md, vlm_perf.json,
# checks.log. A step that fails or times out is logged and the next one runs.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
exec > >(tee "$OUT/checks.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
start=$(date +%s)
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s, at $(( $(date +%s) - start ))s)"
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  echo "== $name: exit $? after $(( $(date +%s) - start ))s"
}
{ nvidia-smi; python3 -c "import torch, sys; print(sys.version); print('torch', torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())"; python3 -m pip list 2>/dev/null \
| grep -i -E '^(torch|transformers|diffusers|accelerate|peft|deepspeed|safetensors) '; } > "$OUT/env.txt" 2>&1
# 1. every gpu-marked test (trainer auto->bf16 + exact resume, fp16 + loss-scaler resume, eval drawing from the CUDA
#    RNG leaves training alone, ZeRO round trip on CUDA/NCCL, losses and reward
#    models on CUDA, diffusion SDXL bf16 smoke, VLM 2B bf16 tokens/s); only the files that hold them are collected
step "pytest -m gpu" 240 env MMALIGN_PERF_OUT="$OUT/vlm_perf.json" python3 -m pytest -m gpu -rA -p no:cacheprovider \
  tests/train/test_trainer.py tests/train/test_zero.py tests/core/test_loss_metrics.py tests/core/test_rng.py \
  tests/core/test_reward_models.py tests/vision_lm/test_perf.py tests/diffusion/test_jobs.py \
  > "$OUT/pytest_gpu.log" 2>&1
tail -5 "$OUT/pytest_gpu.log"
# 2. core losses: eager loss vs plain reference on the GPU (docs/benchmarks/core_losses.md section)
step "bench_core_losses cuda" 60 python3 scripts/bench_core_losses.py --device cuda --batch 4096 65536
cp docs/benchmarks/core_losses.md "$OUT/core_losses.md" 2>/dev/null
# 3. MaPO vs Diffusion-DPO on the GPU: step time, memory, SDXL-size bf16 images/s, largest batch (issue 7)
step "bench_diffusion_perf --gpu" 270 python3 scripts/bench_diffusion_perf.py --gpu --steps 3
cp docs/benchmarks/diffusion.md "$OUT/diffusion.md" 2>/dev/null
echo "== done after $(( $(date +%s) - start ))s"
