# Shared by the example scripts: MODEL=gpt2 (or any hub id / local dir / .gguf) overrides
# the embedded default model; OUT=dir changes where results go.
set -euo pipefail
MODEL_ARGS=()
if [ -n "${MODEL:-}" ]; then MODEL_ARGS=(--model "$MODEL"); fi
OUT=${OUT:-outputs/examples}
MODEL_TAG=$(basename "${MODEL:-embedded}")
