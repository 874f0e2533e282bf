#!/usr/bin/env bash
# Seed workflow 4: activation-weighted magnitude (MODEL=EleutherAI/pythia-410m in the seed).
. "$(dirname "$0")/_common.sh"
cwa run "${MODEL_ARGS[@]}" --metric act_mag --topk 200 --mode global \
    --out-dir "$OUT/04_${MODEL_TAG}_act_mag"
