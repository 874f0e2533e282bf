#!/usr/bin/env bash
# Seed workflow 10: K-value sensitivity study, as one sweep sharing one scoring pass per
# seed; adds plots/grad_x_weight_dose_response.png (delta NLL against K). `cwa compare`
# then writes the sweep's table (comparison.csv: one row per seed x K x condition), the
# dose response with control bands and report.html.
. "$(dirname "$0")/_common.sh"
cwa run "${MODEL_ARGS[@]}" --metric grad_x_weight --topk 50,100,200,500 --mode global \
    --perturb sign_flip --controls random_k,bottom_k --out-dir "$OUT/10_${MODEL_TAG}_k_sweep"
cwa compare "$OUT/10_${MODEL_TAG}_k_sweep" -o "$OUT/10_${MODEL_TAG}_k_sweep_compare"
