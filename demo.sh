#!/usr/bin/env bash
# The headline demo (docs/DESIGN.md, "The synthetic world"), the paper's ablation in miniature, on a laptop CPU:
#   synthetic data -> one SFT warm-up on all three tasks -> per task { GRPO | more SFT for the same extra
#   wall time } -> held-out evaluation, then per task a table (mean and range over 3 evaluation seeds)
#   and the GRPO reward curve.
#
#   bash demo.sh                      all three tasks
#   bash demo.sh grounding            one task (detection | grounding | spatial), after the shared warm-up
#   TRAIN_SEEDS="0 1 2" bash demo.sh  each arm over 3 training seeds (a second table: the runs' spread)
#   OUT=runs/nogeo SFT_FLAGS="--geometry off" bash demo.sh grounding   the geometry-prior ablation
#                                     (its own warm-up in $OUT/sft, runs and report under $OUT)
#
# Every step is a plain script with its own --help; change the numbers here to scale it.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
TASKS=${1:-all}
[ "$TASKS" = all ] && TASKS="detection grounding spatial"
for task in $TASKS; do
  case $task in detection|grounding|spatial) ;; *) echo "usage: bash demo.sh [all|detection|grounding|spatial]" >&2; exit 2;; esac
done
SFT_STEPS=${SFT_STEPS:-3000}        # shared supervised warm-up steps (batch 16, the three tasks mixed)
GRPO_STEPS=${GRPO_STEPS:-}         # GRPO steps (8 prompts x G=8 completions) for every task; default per task below
TRAIN_SEEDS=${TRAIN_SEEDS:-0}       # training seeds per arm (GRPO and more SFT), e.g. "0 1 2"
EVAL_LIMIT=${EVAL_LIMIT:-600}       # held-out records per evaluation seed and task
OUT=${OUT:-runs}                    # every run folder and report goes under here
SFT_FLAGS=${SFT_FLAGS:-}            # extra flags of the warm-up (e.g. --geometry off); GRPO and more SFT inherit its model
# Speed on the toy (docs/EXPERIMENTS.md item 35): a whole 16-record batch in one pass (0.39 -> 0.36 s a
# step here; the same gradient), and 64 prompts decoded together in evaluation (a quarter faster).
SFT_SPEED="--micro-batch 16"
# Evaluations run EVAL_JOBS at a time, the cores shared among them (item 39: two one-thread
# evaluations side by side finish in two thirds of the time of one two-thread run after another,
# with the same completions). Greedy decoding makes them independent of each other's timing.
EVAL_JOBS=${EVAL_JOBS:-2}
EVAL_THREADS=$(( $(nproc) / EVAL_JOBS > 0 ? $(nproc) / EVAL_JOBS : 1 ))
PLOTS=$( [ "$OUT" = runs ] && echo docs || echo "$OUT" )   # the reward curves the README shows come from the default run
start=$(date +%s)
stage() { echo "== $* [$(( $(date +%s) - start )) s in]"; }   # a step title, with the time so far

# GRPO arms per task, "name:flags" (docs/EXPERIMENTS.md). Each task's default reward
# (rewards.TASK_REWARDS): detection R_format + R_IoU + R_F1, rollouts at T 0.7 (item 10);
# grounding R_format + R_frame + R_IoU; spatial R_format + accuracy / MRA by question type, the
# paper's way (LoRA, beta = 0) and, beside it, full fine-tuning with the KL term (beta 0.04).
grpo_arms() {
  case $1 in
    detection|grounding) echo "grpo:--temperature=0.7";;
    spatial)   echo "grpo:--lora-rank=8,--lora-alpha=16,--beta=0,--lr=3e-3 grpo_full:--beta=0.04";;
  esac
}
# GRPO steps per task: where the training reward of a longer run levels off (docs/EXPERIMENTS.md
# item 34: detection's R_IoU + R_F1 by step ~90, grounding's R_frame + R_IoU by ~120, spatial 60).
grpo_steps() {
  [ -z "$GRPO_STEPS" ] || { echo "$GRPO_STEPS"; return; }
  case $1 in detection) echo 90;; grounding) echo 120;; spatial) echo 60;; esac
}
arm_title() { [ "$1" = grpo_full ] && echo "SFT -> GRPO (full; beta 0.04)" || { [ "$2" = spatial ] && echo "SFT -> GRPO (LoRA; beta 0)" || echo "SFT -> GRPO"; }; }
# The task's headline metric first (the table's order).
report_metrics() {
  case $1 in
    detection) echo "detection/F1@0.25,detection/P@0.25,detection/R@0.25,detection/F1@0.5,detection/format";;
    grounding) echo "grounding/Acc@0.25,grounding/Acc@0.5,grounding/mean IoU,grounding/frame acc,grounding/format";;
    spatial)   echo "spatial/overall,spatial/object_counting (mra),spatial/object_abs_distance (mra),spatial/object_size_estimation (mra),spatial/room_size_estimation (mra),spatial/object_rel_distance (accuracy),spatial/object_rel_direction (accuracy),spatial/obj_appearance_order (accuracy),spatial/format";;
  esac
}

stage "1. synthetic world (train 150 scenes, held-out 600 scenes)"
# Made once and reused; a folder from an older version with another number of training scenes,
# fewer held-out scenes, or grounding records on other frames, is made again (the tables need
# scenes.py's defaults). An SFT checkpoint trained on the old folder is older than the new
# records, so step 2 sets it aside and trains on the new one.
current=$($PY -c "
import json, scenes
try:
    n_train = sum(1 for _ in open('data/toy/train/detection.jsonl'))
    n = sum(1 for _ in open('data/toy/val/detection.jsonl'))
    first = json.loads(open('data/toy/val/grounding.jsonl').readline())
    ok = (n_train == scenes.DEFAULT_TRAIN_SCENES * scenes.DETECTION_RECORDS and len(first['images']) == scenes.GROUNDING_FRAMES
          and n >= scenes.DEFAULT_VAL_SCENES * scenes.DETECTION_RECORDS)
    print('yes' if ok else 'no')
except (OSError, KeyError, ValueError):
    print('no')")
if [ "$current" != yes ]; then
  $PY scenes.py --out data/toy --no-progress --workers "$(nproc)"   # the same bytes for any --workers
fi
$PY scenes.py preview --data data/toy --out docs/preview.png

stage "2. SFT warm-up on detection, grounding and spatial QA"
# A finished $OUT/sft is reused, unless it stopped early or was trained for another step count,
# task mix, geometry switch or toy model size (e.g. by an older version of this script), or is
# older than data/toy's training records (made again since, by this run or another $OUT's): it
# is then moved aside to $OUT/sft.stale.
reusable=$($PY -c "
import json, os, model, sft
try:
    older = os.path.getmtime('$OUT/sft/latest/trainer_state.json') < os.path.getmtime('data/toy/train/detection.jsonl')
    state = json.load(open('$OUT/sft/latest/trainer_state.json'))
    text = json.load(open('$OUT/sft/latest/config.json'))['text_config']
    size, geometry = model.ToySize(), sft.parse_args('$SFT_FLAGS'.split()).geometry
    same = (state['step'], state['args']['steps'], list(state['args']['tasks']), state['args']['geometry'],
            text['hidden_size'], text['num_hidden_layers'])
    print('yes' if same == ($SFT_STEPS, $SFT_STEPS, ['detection', 'grounding', 'spatial'], geometry, size.hidden, size.layers) and not older else 'no')
except (OSError, KeyError, TypeError, ValueError):
    print('no')")
if [ "$reusable" != yes ]; then
  if [ -d $OUT/sft ]; then
    echo "$OUT/sft is unfinished, has other settings or predates data/toy: moving it to $OUT/sft.stale"
    rm -rf "$OUT/sft.stale"; mv "$OUT/sft" "$OUT/sft.stale"
  fi
  $PY sft.py --out $OUT/sft --tasks detection,grounding,spatial --steps "$SFT_STEPS" $SFT_FLAGS $SFT_SPEED --no-progress
fi

evaluate() {  # evaluate MODEL TASK OUT_FOLDER: 3 evaluation seeds, each another EVAL_LIMIT held-out records
  mkdir -p "$3"
  OMP_NUM_THREADS=$EVAL_THREADS $PY eval.py --model "$1" --data data/toy --split val --tasks "$2" --limit "$EVAL_LIMIT" \
    --seed 0,1,2 --batch-size 64 --no-progress --out "$3/eval_seed{seed}.json" > /dev/null
}
# evaluate in the background, at most EVAL_JOBS at once; a failure is remembered in $failed
# (a background job's exit status would be lost) and stops the script at wait_evaluations.
failed=$OUT/.evaluation_failed
queue_evaluation() {
  while [ "$(jobs -rp | wc -l)" -ge "$EVAL_JOBS" ]; do wait -n || true; done
  { evaluate "$@" || { echo "error: the evaluation of $1 failed" >&2; touch "$failed"; }; } &
}
wait_evaluations() { wait; [ ! -e "$failed" ] || { rm -f "$failed"; exit 1; }; }

for task in $TASKS; do
  stage "3. $task: GRPO from the SFT checkpoint (timed), then more SFT for the same wall time"
  declare -A runs=()
  more_runs=""
  for seed in $TRAIN_SEEDS; do
    grpo_seconds=0
    for arm in $(grpo_arms "$task"); do
      name=${arm%%:*}; flags=${arm#*:}
      t0=$(date +%s.%N)
      $PY grpo.py --init $OUT/sft/latest --task "$task" --out "$OUT/$task/${name}_s$seed" --overwrite --seed "$seed" \
        --steps "$(grpo_steps "$task")" ${flags//,/ } --no-progress
      [ "$grpo_seconds" != 0 ] || grpo_seconds=$($PY -c "print(round($(date +%s.%N) - $t0, 1))")   # the first arm's
      runs[$name]="${runs[$name]:-}+$OUT/$task/${name}_s$seed"
    done
    # More SFT until GRPO's wall time is spent (start-up, loading and checkpoints included on both
    # sides), at a constant learning rate after 10 warm-up steps, as GRPO's: no step count to
    # guess beforehand, and no schedule cut short (docs/EXPERIMENTS.md item 40).
    echo "   more SFT: ${grpo_seconds}s, GRPO's"
    $PY sft.py --model $OUT/sft/latest --tasks "$task" --out "$OUT/$task/sft_more_s$seed" --overwrite --seed "$seed" $SFT_SPEED \
      --steps 1000000 --max-seconds "$grpo_seconds" --lr 5e-4 --min-lr-ratio 1 --warmup 10 --no-progress
    more_runs="$more_runs+$OUT/$task/sft_more_s$seed"
  done

  stage "4. $task: held-out evaluation, 3 seeds each"
  rm -f "$failed"
  queue_evaluation $OUT/sft/latest "$task" "$OUT/$task/sft"
  table="SFT=$OUT/$task/sft,SFT -> more SFT=${more_runs#+}"
  for arm in $(grpo_arms "$task"); do
    name=${arm%%:*}
    for run in ${runs[$name]//+/ }; do queue_evaluation "$run/latest" "$task" "$run"; done
    table="$table,$(arm_title "$name" "$task")=${runs[$name]#+}"
  done
  for run in ${more_runs//+/ }; do queue_evaluation "$run/latest" "$task" "$run"; done
  wait_evaluations

  stage "5. $task: report"
  $PY report.py --runs "$table" --metrics "$(report_metrics "$task")" \
    --grpo-metrics "$OUT/$task/grpo_s${TRAIN_SEEDS%% *}/metrics.jsonl" --plot "$PLOTS/reward_curve_$task.png" \
    | tee "$OUT/report_$task.md"
  unset runs
done
echo "total wall time: $(( $(date +%s) - start ))s"
