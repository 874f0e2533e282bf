#!/usr/bin/env bash
# Seed workflow 6: Gaussian noise perturbation analysis.
. "$(dirname "$0")/_common.sh"
cwa run "${MODEL_ARGS[@]}" --metric grad_squared --topk 100 --perturb gauss_noise \
    --perturb-scale 0.1 --controls random_k,bottom_k \
    --out-dir "$OUT/06_${MODEL_TAG}_gauss_noise"
