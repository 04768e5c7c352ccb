#!/usr/bin/env bash
# One prepared full-size check for a session with a GPU, no weights, no network. Every section has its own
# timeout and they sum to 475 s, so the whole script ends within 8 minutes even when a section hangs:
#   1. the complexity table with per-module latency at 512x512 (bf16),
#   2. inference at 512x512, batch 1 and 8: plain fp32 vs merged LoRA + SDPA + bf16 (+ torch.compile),
#   3. training step time and peak CUDA memory at 512x512, batch 1, per memory option (compare with the
#      prediction `python benchmarks/bench_memory.py --batches 1` prints on any machine).
#   4. Real-ESRGAN degradation on CUDA, 8 x 512x512: batched (grouped per sample, no shared canvas) vs one
#      sample at a time vs the plain path (blur=plain) on the same parameter draws, and the batch's agreement
#      with its samples processed alone,
#   5. generator.compile=true (inductor) in training, tiny preset at 256 px: compile time (first step) and
#      steady-state step time against eager,
#   5b. host-device syncs per training step in the real loop (torch's CUDA sync debug mode), tiny preset:
#      with logging every step and with no log step (the goal: none outside log steps),
#   6. the new backbones at their native 1024 px (sdxl_shape, sd3_shape with T5; random weights built on the card):
#      one training step (best memory options, batch 1) and one 4x inference (bf16), seconds and
#      max_memory_allocated (compare with the README's predicted peaks).
#   7. the adversarial methods (hypir with a random ConvNeXt-XXLarge-shaped discriminator, osediff_gan) at 512x512 on
#      sd21_shape, bf16-mixed with frozen bf16 weights, batch 1: seconds per training step (G and every further group)
#      and peak CUDA memory beside osediff_lab.memory's prediction (benchmarks/bench_gan.py).
# Needs only torch, pytorch-lightning, transformers, peft, diffusers (+ hydra-core, omegaconf, lpips, timm,
# which our package imports) and this package: carry .venv (or install `pip install -e .` with those wheels);
# bitsandbytes is optional (the 8-bit AdamW rows are skipped without it).
# Usage: bash benchmarks/gpu_check.sh [output dir]    (prints a compact table; also writes it to the dir)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-${OUT:-outputs/gpu_check}}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
TRAIN_CASES=("plain fp32" "grad checkpointing" "frozen bf16 (bf16-mixed)" "LPIPS bf16" "all of the above")
if $PY -c "import bitsandbytes" 2>/dev/null; then TRAIN_CASES+=("8-bit AdamW"); fi
timeout 60 $PY -m osediff_lab.profile model=sd21_shape profile.latency.repeats=10 \
  paths.output_root="$OUT" 2>&1 | grep -v -i warn | tee "$OUT/profile.txt" || echo "profile: timed out or failed"
timeout 75 $PY benchmarks/bench_perf.py --model sd21_shape --size 512 --batches 1 8 --repeats 3 --train-cases \
  --infer-cases "plain fp32" "merged + SDPA + bf16" "merged + SDPA + bf16 + compile" 2>&1 | grep -v -i warn \
  | tee "$OUT/inference.txt" || echo "inference: timed out or failed"
timeout 80 $PY benchmarks/bench_perf.py --model sd21_shape --size 512 --train-batches 1 --repeats 3 --no-predict --infer-cases \
  --train-cases "${TRAIN_CASES[@]}" 2>&1 | grep -v -i warn | tee "$OUT/training.txt" || echo "training: timed out or failed"
timeout 20 $PY benchmarks/bench_degradation.py --device cuda --repeats 3 --threads 0 2>&1 | grep -v -i warn \
  | tee "$OUT/degradation.txt" || echo "degradation: timed out or failed"
timeout 70 $PY benchmarks/bench_release.py --device cuda --rows train --compile --repeats 5 --threads 0 2>&1 \
  | grep -v -i warn | tee "$OUT/compile.txt" || echo "compile: timed out or failed"
timeout 25 $PY benchmarks/bench_release.py --device cuda --rows syncs --threads 0 2>&1 | grep -v -i warn \
  | tee "$OUT/syncs.txt" || echo "syncs: timed out or failed"
timeout 65 $PY benchmarks/bench_backbones.py --measure --models sdxl_shape sd3_shape 2>&1 | grep -v -i warn \
  | tee "$OUT/backbones.txt" || echo "backbones: timed out or failed"
timeout 80 $PY benchmarks/bench_gan.py --model sd21_shape --size 512 --batch 1 --repeats 3 2>&1 | grep -v -i warn \
  | tee "$OUT/gan.txt" || echo "gan: timed out or failed"
