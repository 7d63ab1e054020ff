#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one go (a few minutes on an H100/H200):
#     bash tools/gpu_bench.sh 2>&1 | tee gpu.txt
# MaskedAdamW's two steps against fused AdamW on TinyLlama-1.1B's shape (201 tensors); the training
# steps of that shape, eager and compiled; SFT, DPO and learn steps against transformers' on that shape
# and SmolLM2-135M's; generation by the project's two loops against transformers' two (where
# transformers is installed) on both shapes; the sample stage's sampling; then the embedded default end
# to end. Each table also goes to $OUT (default gpu_out/).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python -m tools.bench_optim --device cuda --config configs/tinyllama-1.1b.json | tee "$OUT/optim.md"
TINYLLAMA="--device cuda --sizes 2048:22:32:4:5632:32000:untied --batch 4 --prompt 256 --response 256"
TINYLLAMA="$TINYLLAMA --jitter 0 --gen-batch 16 --new 64"
python -m tools.bench_train $TINYLLAMA | tee "$OUT/train.md"
python -m tools.bench_train $TINYLLAMA --compile | tee "$OUT/train_compiled.md"
# SFT, DPO and learn steps against transformers' model of the same shape through the same loss code, with
# MFU (where transformers is installed; else the project alone)
VERSUS="--device cuda --versus-hf --sizes 135m,1.1b --batch 4 --prompt 256 --response 256 --jitter 0"
python -m tools.bench_train $VERSUS | tee "$OUT/train_vs_hf.md"
# SmolLM2-135M's shape on rows of GSM8K-like lengths under a chat template, padded and packed (#34)
SMOL="--device cuda --sizes 135m --batch 8 --prompt 100 --response 130 --jitter 0.6 --pack"
SMOL="$SMOL --gen-batch 64 --new 64"
python -m tools.bench_train $SMOL | tee "$OUT/train_135m.md"
python -m tools.bench_train $SMOL --compile | tee "$OUT/train_135m_compiled.md"
python -m tools.bench_generate --device cuda --shapes 135m,1.1b --batches 16,64,256 --prompt 32 --new 128 \
    --repeats 2 | tee "$OUT/generate.md"
# the sample stage's generation (10 samples a prompt, temperature 0.7, top-p 0.95) now, as it ran before
# 2026-12-07 and by transformers, on random weights of SmolLM2-135M's shape (a checkpoint written first)
python -c "from model import Transformer; from tools.bench_train import model_config as c
Transformer(c('135m', 512)).save_pretrained('/tmp/gpu_smol_random')"
python -m tools.bench_generate --device cuda --model /tmp/gpu_smol_random --sampling 10 --batch 320 \
    --prompt 64 --new 128 --repeats 2 | tee "$OUT/sampling.md"
rm -rf /tmp/gpu_default
time python train.py --device cuda --run /tmp/gpu_default | tee "$OUT/default_run.txt"
