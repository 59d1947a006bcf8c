#!/usr/bin/env bash
# The headline demo (docs/DESIGN.md, "The synthetic world"), the paper's ablation in miniature, on a laptop CPU:
#   synthetic data -> SFT -> { GRPO | more SFT for the same extra wall time } -> held-out evaluation
# then a table (mean and range over 3 evaluation seeds) and the GRPO reward curve.
# Every step is a plain script with its own --help; change the numbers here to scale it.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
SFT_STEPS=${SFT_STEPS:-2500}        # supervised warm-up steps (batch 16)
GRPO_STEPS=${GRPO_STEPS:-60}        # GRPO steps (8 prompts x G=8 completions)
GRPO_TEMP=${GRPO_TEMP:-0.7}         # sampling temperature of the rollouts (docs/EXPERIMENTS.md item 10: 1.0 mostly sharpens)
EVAL_LIMIT=${EVAL_LIMIT:-600}       # held-out detection records per evaluation seed (of 600 scenes x 3)
start=$(date +%s)

echo "== 1. synthetic world (train 500 scenes, held-out 600 scenes)"
# Made once and reused; a folder from an older version with fewer held-out scenes is made again
# (the table needs scenes.py's defaults: val scenes x detection records per scene), and an SFT
# checkpoint trained on the old folder is then dropped, so that step 2 trains on the new one.
set_sft_aside() { echo "$1: moving runs/sft to runs/sft.stale"; rm -rf runs/sft.stale; mv runs/sft runs/sft.stale; }
needed=$($PY -c "import scenes; print(scenes.DEFAULT_VAL_SCENES * scenes.DETECTION_RECORDS)")
val_records=$( [ -f data/toy/val/detection.jsonl ] && wc -l < data/toy/val/detection.jsonl || echo 0 )
if [ "$val_records" -lt "$needed" ]; then
  $PY scenes.py --out data/toy --no-progress
  [ ! -d runs/sft ] || set_sft_aside "data/toy was made again"
fi
$PY scenes.py preview --data data/toy --out docs/preview.png

echo "== 2. SFT warm-up"
# A finished runs/sft is reused, unless it stopped early or was trained for another step count
# or toy model size (e.g. by an older version of this script): it is then moved aside.
reusable=$($PY -c "
import json, model
try:
    state = json.load(open('runs/sft/latest/trainer_state.json'))
    text = json.load(open('runs/sft/latest/config.json'))['text_config']
    size = model.ToySize()
    same = (state['step'], state['args']['steps'], text['hidden_size'], text['num_hidden_layers'])
    print('yes' if same == ($SFT_STEPS, $SFT_STEPS, size.hidden, size.layers) else 'no')
except (OSError, KeyError, TypeError, ValueError):
    print('no')")
if [ "$reusable" != yes ]; then
  [ ! -d runs/sft ] || set_sft_aside "runs/sft is unfinished or has other settings"
  $PY sft.py --out runs/sft --steps "$SFT_STEPS" --no-progress
fi

echo "== 3. GRPO from the SFT checkpoint (timed)"
t0=$(date +%s)
$PY grpo.py --init runs/sft/latest --out runs/grpo --overwrite --steps "$GRPO_STEPS" --temperature "$GRPO_TEMP" --no-progress
grpo_seconds=$(( $(date +%s) - t0 ))

echo "== 4. SFT -> more SFT for the same wall time (${grpo_seconds}s)"
# Steps that fit in GRPO's wall time at the measured SFT step time of step 2.
sft_step_s=$($PY -c "import json; r=sorted(x['step_s'] for x in map(json.loads, open('runs/sft/metrics.jsonl')) if 'step_s' in x); print(r[len(r)//2])")
more_steps=$($PY -c "print(max(1, int($grpo_seconds / $sft_step_s)))")
$PY sft.py --model runs/sft/latest --out runs/sft_more --overwrite --steps "$more_steps" --lr 5e-4 --warmup 10 --no-progress

echo "== 5. held-out evaluation, 3 seeds each"
for run in sft sft_more grpo; do
  for seed in 0 1 2; do
    $PY eval.py --model runs/$run/latest --data data/toy --split val --tasks detection \
      --limit "$EVAL_LIMIT" --seed $seed --no-progress --out runs/$run/eval_seed$seed.json > /dev/null
  done
done

echo "== 6. report"
$PY report.py --runs "SFT=runs/sft,SFT -> more SFT=runs/sft_more,SFT -> GRPO=runs/grpo" \
  --metrics "detection/F1@0.25,detection/P@0.25,detection/R@0.25,detection/F1@0.5,detection/format" \
  --grpo-metrics runs/grpo/metrics.jsonl --plot docs/reward_curve.png | tee runs/report.md
echo "total wall time: $(( $(date +%s) - start ))s"
