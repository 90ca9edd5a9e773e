#!/usr/bin/env bash
# Install zseg and segment a synthetic volume of touching cells (works offline).
source "$(dirname "$0")/env.sh"
OUT="${1:-$ROOT/demo}"
zseg synth "$OUT" --shape 48,128,128 --diameter 16 --overwrite
zseg -v run "$OUT/image.ome.zarr" "$OUT/result" --flows "$OUT/flows.zarr" \
    --diameter 16 --chunk-shape 32,64,64 --workers 2 --overwrite
python "$ROOT/benchmarks/accuracy.py" "$OUT/image.ome.zarr" "$OUT/result"
