#!/usr/bin/env bash
# Seed workflow 7: stability analysis across seeds.
. "$(dirname "$0")/_common.sh"
cwa run "${MODEL_ARGS[@]}" --metric grad_x_weight --topk 100 --seeds 0,1,2,3,4 \
    --stability-check --save-plots --out-dir "$OUT/07_${MODEL_TAG}_stability"
