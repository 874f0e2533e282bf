#!/usr/bin/env bash
# Seed workflow 9: compare metrics: their top-K overlap with `cwa stability`, then every
# run side by side with `cwa compare` (comparison.json / .csv, figures, report.html).
. "$(dirname "$0")/_common.sh"
scores=()
dirs=()
for metric in grad_x_weight grad_squared hutchinson_diag magnitude; do
    dir="$OUT/09_${MODEL_TAG}_comparison_${metric}"
    cwa run "${MODEL_ARGS[@]}" --metric "$metric" --topk 100 --mode global \
        --controls random_k,bottom_k --seeds 0 --out-dir "$dir" --save-plots
    scores+=("$dir/artifacts/scores_seed0.safetensors")
    dirs+=("$dir")
done
# Top-K overlap matrix across metrics (labels are the metric names).
cwa stability "${scores[@]}" --topk 100 --json "$OUT/09_${MODEL_TAG}_metric_overlap.json" \
    -o "$OUT/09_${MODEL_TAG}_metric_overlap.h5"
cwa plot "$OUT/09_${MODEL_TAG}_metric_overlap.h5" -o "$OUT/09_${MODEL_TAG}_metric_overlap_plots"
# The four runs side by side: delta NLL vs controls, top-100 Jaccard and location, report.html.
cwa compare "${dirs[@]}" -o "$OUT/09_${MODEL_TAG}_compare"
