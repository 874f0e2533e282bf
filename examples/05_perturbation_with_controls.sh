#!/usr/bin/env bash
# Seed workflow 5: complete perturbation study with controls.
. "$(dirname "$0")/_common.sh"
cwa run "${MODEL_ARGS[@]}" --metric grad_x_weight --topk 100 --mode global \
    --perturb sign_flip --perturb-scale 1.0 --controls random_k,bottom_k --save-plots \
    --out-dir "$OUT/05_${MODEL_TAG}_sign_flip_controls"
