#!/usr/bin/env bash
# Install zseg and segment a synthetic volume of touching cells (works offline).
source "$(dirname "$0")/env.sh"
OUT="${1:-$ROOT/demo}"
zseg synth "$OUT" --shape 48,128,128 --diameter 16 --overwrite
zseg -v run "$OUT/image.ome.zarr" "$OUT/result" --flows "$OUT/flows.zarr" \
    --diameter 16 --chunk-shape 32,64,64 --workers 2 --overwrite > "$OUT/run-summary.json"
echo "zseg: labels, cells.parquet and qc/report.html are in $OUT/result (summary: $OUT/run-summary.json)"
python "$ROOT/benchmarks/accuracy.py" "$OUT/image.ome.zarr" "$OUT/result"
