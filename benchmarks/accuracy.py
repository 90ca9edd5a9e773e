"""Compare a zseg result with the ground truth of a `zseg synth` volume.

    python benchmarks/accuracy.py IMAGE.ome.zarr RESULT_FOLDER

Prints the number of cells, AP at IoU 0.5/0.75/0.9 (Cellpose's metric) and the run's
chunk-exactness report.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import zarr
from cellpose.metrics import average_precision


def main(image: str, result: str) -> None:
    truth = np.asarray(zarr.open_array(os.path.join(image, "labels", "cells", "0"), mode="r")[...])
    labels = np.asarray(zarr.open_array(os.path.join(result, "labels.zarr", "0"), mode="r")[...])
    ap = average_precision([truth.astype(np.int64)], [labels.astype(np.int64)], threshold=[0.5, 0.75, 0.9])[0][0]
    report = json.load(open(os.path.join(result, "run.json")))["result"]
    print(f"cells: truth {int(truth.max())}, zseg {report['cells']}")
    print(f"AP@0.5 {ap[0]:.3f}  AP@0.75 {ap[1]:.3f}  AP@0.9 {ap[2]:.3f}")
    print(f"chunk-exact: {report['chunk_exact']}  (long trajectories {report['long_trajectories']}, "
          f"cells cut by a block face {report['cells_cut_by_block']})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
