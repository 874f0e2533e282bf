#!/usr/bin/env bash
# Seed workflow 8: the complete analysis (MODEL=meta-llama/Llama-3.1-8B in the seed).
. "$(dirname "$0")/_common.sh"
cwa run "${MODEL_ARGS[@]}" --metric hutchinson_diag --topk 100 --mode global \
    --perturb sign_flip --perturb-scale 1.0 --controls random_k,bottom_k \
    --seeds 0,1,2 --stability-check --save-plots \
    --out-dir "$OUT/08_${MODEL_TAG}_hutch_diag_k100" --verbose
