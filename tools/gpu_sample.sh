#!/usr/bin/env bash
# The sample stage of docs/own-model.md's SmolLM2-135M-Instruct run at 10x the preset's budgets, three
# seeds side by side on one GPU, with each generation loop in turn: batches (Transformer.generate),
# then slots (generate_refill, its decode step replayed from a CUDA graph). Needs, in the repository
# root, the checkpoint folder smollm2/ and the question files train.jsonl (1200 rows), val.jsonl and
# test.jsonl (docs/own-model.md says how to make them). Writes the times to $OUT (default gpu_out/).
#     bash tools/gpu_sample.sh 2>&1 | tee gpu_sample.txt
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
R=runs/smol10x-sample
mkdir -p "$OUT"
F=(--preset pretrained --prompt-template chat --gen-batch-size 256 --ref-batch-size 64 --threads 4 --device cuda)
for s in 0 1 2; do  # the three seeds' SFT models, side by side
  python train.py --stage sft --model smollm2 --data train.jsonl --eval-questions val.jsonl --sft-steps 400 \
      --seed $s --out $R/seed$s/sft "${F[@]}" > "$OUT/sft-seed$s.txt" &
done
wait
for loop in batches slots; do  # each loop's three sample stages side by side, as the study runs them
  SECONDS=0
  for s in 0 1 2; do
    python train.py --stage sample --model $R/seed$s/sft --questions train.jsonl \
        --eval-questions val.jsonl test.jsonl --n-sample 1200 --seed $s --decode $loop \
        --out $R/seed$s/sample-$loop "${F[@]}" > "$OUT/sample-$loop-seed$s.txt" &
  done
  wait
  echo "--decode $loop: three sample stages side by side in $SECONDS s" | tee -a "$OUT/sample_times.txt"
done
