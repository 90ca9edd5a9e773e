#!/usr/bin/env bash
# The GPU benchmark set in one go (about 5-8 minutes on one H100): the network phase against
# Cellpose's eval (full CPSAM: Cellpose's width and its 24 blocks, bfloat16), with the tile ratio
# and the predict task's peak memory at two volume sizes, then the dynamics on CUDA. Prints the
# tables for the README, with the device each ran on.
#
#   bash benchmarks/gpu.sh            # on a machine with an NVIDIA GPU
#   ZSEG_BENCH_SMOKE=1 bash benchmarks/gpu.sh   # the same commands, tiny and on the CPU (a check)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
if [ "${ZSEG_BENCH_SMOKE:-0}" = 1 ]; then
  dev=cpu; width=(--width tiny); small=16,64,64; large=16,128,128; chunk=8,40,40; dyn=32,64,64; limit=300
else
  dev=cuda; width=(--width vit-l --blocks 24); small=64,512,512; large=64,1024,1024; chunk=64,200,200; dyn=96,256,256; limit=600
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi: $dev"
echo
echo "## predict, $small (chunks $chunk)"
timeout "$limit" python benchmarks/predict.py --shape "$small" "${width[@]}" --chunk-shape "$chunk" \
  --device "$dev" --batch-size 32 --predict-memory 4
echo
echo "## predict, $large (same parameters: the predict task's peak memory must not grow)"
timeout "$limit" python benchmarks/predict.py --shape "$large" "${width[@]}" --chunk-shape "$chunk" \
  --device "$dev" --batch-size 32 --predict-memory 4 --only "zseg predict"
echo
echo "## dynamics, $dyn on $dev"
timeout "$limit" python benchmarks/dynamics.py --shape "$dyn" --diameter 16 --chunk-shape 48,128,128 --device "$dev"
