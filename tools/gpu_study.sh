#!/usr/bin/env bash
# #35's fair test on one GPU: SmolLM2-135M-Instruct (or any model folder or GGUF file given) on a harder
# variant of the embedded task, the authors' protocol (--preset release: 10 samples a problem, 5 pairs a
# problem, 5% masks, eps 0.1, one epoch per preference stage), every arm's rates chosen on val from one
# grid (--lr-grid), then every pipeline seed at the chosen rates, scored on test:
#     bash tools/gpu_study.sh SmolLM2-135M-Instruct.Q4_1.gguf 2>&1 | tee gpu_study.txt
# Needs nothing but the model file (the gguf, tokenizers and jinja2 packages for a GGUF file). Writes the
# task, the run and $OUT/ (default gpu_out/): results.json, table.md and the figures of the study, and
# the time of each phase. Sizes by environment: SEEDS (3), GRID ("0.5 1 2"), N_TRAIN (1200), N_TEST (500),
# SFT_STEPS (400), HELD_OUT_K (4: samples per val/test question, whose pairs only score the models), TASK
# (the variant, TaskConfig fields), ARMS; DEVICE (cuda) and EXTRA (more study flags)
# for a dry run elsewhere.
# Not yet run on a GPU: its first run says how long each phase takes; cut SEEDS, GRID or ARMS to fit 10 min.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: bash tools/gpu_study.sh MODEL (a model folder or a .gguf file)}
OUT=${OUT:-gpu_out}
R=${RUN:-runs/gpu-study}
SEEDS=${SEEDS:-3}
GRID=${GRID:-0.5 1 2}
# the variant: 3-4 steps, operands to 20, counts to 199, multiplication; SmolLM2 reached 8.3% on val after the
# pretrained preset's 40 SFT steps on 2 CPU cores (the embedded task 51.7%, which 400 steps took to 96%):
# check the study's SFT row, and take max_value=99 ops=+- (28.3% at 40 steps) if it lands below 30%
TASK=${TASK:-min_steps=3 max_steps=4 max_operand=20 max_value=199 ops=+-*}
ALL_ARMS="SFT|DPO full|DPO top|DPO bottom|DPO LoRA|ALLO|ALLO w/o forgetting|ALLO w/o neuron masks"
ARMS=${ARMS:-$ALL_ARMS|ALLO w/o key tokens}
mkdir -p "$OUT" "$R"
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null | tee "$OUT/gpu.txt" || true
SECONDS=0
python - "$R/task" ${N_TRAIN:-1200} ${N_TEST:-500} $TASK <<'PY'
import sys, task
folder, n_train, n_test, *fields = sys.argv[1:]
given = dict(f.split("=") for f in fields)
config = task.TaskConfig(n_train=int(n_train), n_val=200, n_test=int(n_test),
                         **{k: v if k == "ops" else int(v) for k, v in given.items()})
if not task.written_with(folder, config, force=True):
    task.write_task(folder, config)
print(f"task: {config}")
PY
IFS='|' read -r -a ARM_LIST <<< "$ARMS"
python -m study --run "$R" --pipeline-seeds "$SEEDS" --lr-grid $GRID --arms "${ARM_LIST[@]}" \
    --model "$MODEL" --questions "$R/task/train.jsonl" \
    --eval-questions "$R/task/val.jsonl" "$R/task/test.jsonl" \
    --preset release --prompt-template chat --sft-steps "${SFT_STEPS:-400}" --n-sample 0 \
    --held-out-k "${HELD_OUT_K:-4}" --device "${DEVICE:-cuda}" \
    --gen-batch-size 256 --ref-batch-size 64 --threads 4 ${EXTRA:-}
echo "study: ${SECONDS}s" | tee "$OUT/time.txt"
cp "$R/study/main/results.json" "$R/study/main/table.md" "$OUT/"
cp "$R"/study/main/*.png "$OUT/" 2>/dev/null || true
