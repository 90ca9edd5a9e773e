#!/usr/bin/env bash
# Install zseg and segment a synthetic volume of touching cells, network included, offline:
# the network is zseg's bundled demo model (a small Cellpose 3 network trained on `zseg synth`
# volumes by scripts/train_demo_model.py; it knows synthetic cells, not real ones).
source "$(dirname "$0")/env.sh"
OUT="${1:-$ROOT/demo}"
zseg synth "$OUT" --shape 48,128,128 --diameter 16 --no-flows --overwrite
zseg -v run "$OUT/image.ome.zarr" "$OUT/result" --model zseg-demo --diameter 16 \
    --chunk-shape 32,64,64 --workers 2 --overwrite > "$OUT/run-summary.json"
echo "zseg: labels, cells.parquet and qc/report.html are in $OUT/result (summary: $OUT/run-summary.json)"
python "$ROOT/benchmarks/accuracy.py" "$OUT/image.ome.zarr" "$OUT/result"
