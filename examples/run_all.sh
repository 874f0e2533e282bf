#!/usr/bin/env bash
# Run the seed's ten workflows in order (nox -s examples). Extra arguments: script numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
for script in examples/[0-9][0-9]_*.sh; do
    n=$(basename "$script" | cut -c1-2)
    if [ $# -gt 0 ] && [[ ! " $* " =~ " $n " ]]; then continue; fi
    echo "== $script" >&2
    start=$(date +%s)
    bash "$script"
    echo "== $script done in $(( $(date +%s) - start ))s" >&2
done
