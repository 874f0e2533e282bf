#!/usr/bin/env bash
# Seed workflow 1: simple gradient-based analysis.
. "$(dirname "$0")/_common.sh"
cwa run "${MODEL_ARGS[@]}" --metric grad_x_weight --topk 100 --mode global \
    --out-dir "$OUT/01_${MODEL_TAG}_grad_x_weight"
