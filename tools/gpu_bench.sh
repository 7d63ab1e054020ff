#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one go (at most 8 minutes on an H100/H200):
#     bash tools/gpu_bench.sh 2>&1 | tee gpu.txt
# Each table goes to $OUT (default gpu_out/), the goals' tables first, so a run cut short keeps them:
#   optim.md            MaskedAdamW's two steps against fused AdamW on TinyLlama-1.1B's shape (201 tensors)
#   train_135m.md       SmolLM2-135M's shape on rows of GSM8K-like lengths, padded and packed, with MFU
#   train.md            the training steps of TinyLlama-1.1B's shape, with MFU
#   train_vs_hf.md      SFT, DPO and learn steps against transformers' model (where installed) on both
#   sampling.md         the sample stage's sampling, now, as before 2026-12-07 and transformers'
#   train_135m_compiled.md, train_compiled.md   the two training tables under torch.compile
#   generate.md         the two generation loops against transformers' two, on both shapes
#   default_run.txt     the embedded default end to end
# Each command runs at most $LIMIT seconds and none starts past $DEADLINE seconds (default 150 and
# 480: the device tool lends 15 minutes, the machine's start included). One that fails, runs past its
# limit or is skipped is named in $OUT/failed.txt, the rest still run, and the script then exits 1.
# GPU_BENCH_DRY=1 runs every command but the two compiled ones once at toy sizes on the CPU (about
# 30 s), to check this script before a GPU is lent; it measures nothing (tests/test_gpu_bench.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
rm -f "$OUT/failed.txt"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

if [ "${GPU_BENCH_DRY:-0}" = 1 ]; then
    DEV=cpu LIMIT=${LIMIT:-120} DEADLINE=${DEADLINE:-600} THREADS="--threads 1" COMPILED=0
    ONE_B=64:2:4:2:128:512:untied SMOL=48:2:4:2:96:512 VERSUS=48:2:4:2:96:512,64:2:4:2:128:512:untied
    LONG="--prompt 12 --response 12 --steps 1 --warmup 0" SMOL_LEN=$LONG GEN="--gen-batch 4 --new 4"
    printf '{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
"intermediate_size": 128, "vocab_size": 512}\n' > "$SCRATCH/config.json"
    OPTIM_CONFIG=$SCRATCH/config.json SAMPLING="--sampling 2 --batch 4 --prompt 8 --new 4 --repeats 1"
    GENERATE="--batches 2 --prompt 8 --new 4 --repeats 1" DEFAULT_RUN="--preset smoke"
else
    DEV=cuda LIMIT=${LIMIT:-150} DEADLINE=${DEADLINE:-480} THREADS="" COMPILED=1
    ONE_B=2048:22:32:4:5632:32000:untied SMOL=135m VERSUS=135m,1.1b
    LONG="--prompt 256 --response 256" SMOL_LEN="--prompt 100 --response 130" GEN="--gen-batch 16 --new 64"
    OPTIM_CONFIG=configs/tinyllama-1.1b.json SAMPLING="--sampling 10 --batch 320 --prompt 64 --new 128 --repeats 2"
    GENERATE="--batches 16,64,256 --prompt 32 --new 128 --repeats 2" DEFAULT_RUN=""
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
fi

# run NAME CMD...: CMD's output to the terminal and $OUT/NAME, for at most $LIMIT seconds and not
# past the deadline
run() {
    local name=$1; shift
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "$name: skipped, $SECONDS s into the script (deadline $DEADLINE s)" | tee -a "$OUT/failed.txt"
        return
    fi
    local limit=$((left < LIMIT ? left : LIMIT))
    echo "== $name ($SECONDS s in, at most $limit s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" != 0 ]; then
        echo "$name: exit status $rc$([ "$rc" = 124 ] && echo ", past $limit s")" | tee -a "$OUT/failed.txt"
    fi
}

run optim.md python -m tools.bench_optim --device $DEV --config "$OPTIM_CONFIG"
# SmolLM2-135M's shape on rows of GSM8K-like lengths under a chat template, padded and packed (#34)
SMOL_TRAIN="--device $DEV $THREADS --sizes $SMOL --batch 8 $SMOL_LEN --jitter 0.6 --pack $GEN"
run train_135m.md python -m tools.bench_train $SMOL_TRAIN
ONE_B_TRAIN="--device $DEV $THREADS --sizes $ONE_B --batch 4 $LONG --jitter 0 $GEN"
run train.md python -m tools.bench_train $ONE_B_TRAIN
# SFT, DPO and learn steps against transformers' model of the same shape through the same loss code, with
# MFU (where transformers is installed; else the project alone)
run train_vs_hf.md python -m tools.bench_train --device $DEV $THREADS --versus-hf --sizes $VERSUS --batch 4 \
    $LONG --jitter 0
# the sample stage's generation (10 samples a prompt, temperature 0.7, top-p 0.95) now, as it ran before
# 2026-12-07 and by transformers, on random weights of SmolLM2-135M's shape (a checkpoint written first)
python -c "import sys; from model import Transformer; from tools.bench_train import model_config as c
Transformer(c(sys.argv[1], 512)).save_pretrained(sys.argv[2])" "$SMOL" "$SCRATCH/smol_random"
run sampling.md python -m tools.bench_generate --device $DEV $THREADS --model "$SCRATCH/smol_random" $SAMPLING
if [ "$COMPILED" = 1 ]; then  # compiling takes minutes on a CPU; tests/test_bench_train.py runs --compile
    run train_135m_compiled.md python -m tools.bench_train $SMOL_TRAIN --compile
    run train_compiled.md python -m tools.bench_train $ONE_B_TRAIN --compile
fi
run generate.md python -m tools.bench_generate --device $DEV $THREADS --shapes $VERSUS $GENERATE
run default_run.txt bash -c "time python train.py --device $DEV $THREADS $DEFAULT_RUN --run $SCRATCH/default"
if [ -s "$OUT/failed.txt" ]; then
    echo "failed:"; cat "$OUT/failed.txt"; exit 1
fi
