#!/usr/bin/env bash
# Seed workflow 3: non-gradient magnitude analysis, top-500 per layer.
. "$(dirname "$0")/_common.sh"
cwa run "${MODEL_ARGS[@]}" --metric magnitude --topk 500 --mode per_layer --save-plots \
    --out-dir "$OUT/03_${MODEL_TAG}_magnitude_per_layer"
