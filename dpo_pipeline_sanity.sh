#!/usr/bin/env bash
# The seed's entry point: SFT → sft_dpo_init_merged → DPO → dpo_sanity_merged → compare → generation test.
#   ./dpo_pipeline_sanity.sh google/gemma-3-270m [extra pipeline flags, e.g. --hardware gaudi2 --out_dir runs/x]
# Same as `make sanity MODEL=...`. All output also goes to <out_dir>/dpo_pipeline_sanity.log.
set -euo pipefail
cd "$(dirname "$0")"
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: $0 MODEL [pipeline flags]   (MODEL is required: there are no default models)" >&2
  exit 2
fi
model="$1"; shift
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || { make setup; }
exec "$PY" -m dpo_dist.pipeline --model "$model" "$@"
