#!/usr/bin/env bash
# Seed workflow 2: Hutchinson diagonal estimator (MODEL=meta-llama/Llama-3.1-8B in the seed).
. "$(dirname "$0")/_common.sh"
cwa run "${MODEL_ARGS[@]}" --metric hutchinson_diag --topk 100 --mode global --seeds 42 \
    --out-dir "$OUT/02_${MODEL_TAG}_hutchinson_diag"
