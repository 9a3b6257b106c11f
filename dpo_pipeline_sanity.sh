#!/usr/bin/env bash
# The seed's entry point: SFT → sft_dpo_init_merged → DPO → dpo_sanity_merged → compare → generation test.
#   ./dpo_pipeline_sanity.sh google/gemma-3-270m [extra pipeline flags, e.g. --hardware gaudi2 --out_dir runs/x]
#   MODEL_NAME=google/gemma-3-270m ./dpo_pipeline_sanity.sh [extra pipeline flags]      (the seed's README)
# Same as `make sanity MODEL=...`. All output also goes to <out_dir>/dpo_pipeline_sanity.log.
set -euo pipefail
cd "$(dirname "$0")"
usage="usage: $0 MODEL [pipeline flags], or MODEL_NAME=MODEL $0 [pipeline flags]   (MODEL is required: there are no default models)"
model="${MODEL_NAME:-}"
if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then
  if [ -n "$model" ] && [ "$model" != "$1" ]; then
    printf 'error: the model argument %q and MODEL_NAME=%q differ. Fix: give the model once, as the first argument or as MODEL_NAME.\n' "$1" "$model" >&2
    exit 2
  fi
  model="$1"; shift
fi
if [ -z "$model" ]; then
  echo "$usage" >&2
  exit 2
fi
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || { make setup; }
exec "$PY" -m dpo_dist.pipeline --model "$model" "$@"
