"""Running the real Nextflow in tests: the launcher scripts/env.sh installs, the run's trace and
labels. The ``nextflow`` fixture (conftest.py) fails in CI when it is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import zarr

from tests.nextflow_text import ROOT
from zseg.cli import main

#: What -profile test makes (conf/test.config): `zseg synth DIR *TEST_SYNTH`, and how it segments it.
TEST_SYNTH = ["--shape", "16,48,48", "--diameter", "12", "--seed", "1"]
TEST_SEGMENT = ["--diameter", "12", "--chunk-shape", "8,24,24"]


def nextflow_env() -> dict:
    """The environment of a Nextflow run: this Python first on PATH (the tasks' python3), no colours."""
    return {**os.environ, "NXF_ANSI_LOG": "false",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def nextflow_run(tmp_path: Path, *args: str, background: bool = False):
    """``nextflow run main.nf -w TMP/work ARGS`` in ``tmp_path``; a Popen with ``background``."""
    argv = ["nextflow", "run", str(ROOT / "main.nf"), "-w", str(tmp_path / "work"), *args]
    if background:
        return subprocess.Popen(argv, cwd=tmp_path, env=nextflow_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return subprocess.run(argv, cwd=tmp_path, env=nextflow_env(), capture_output=True, text=True, timeout=1200)


def trace(tmp_path: Path) -> list[dict]:
    """The rows of the last run's execution trace (the file is overwritten by each run)."""
    lines = (tmp_path / "pipeline_info" / "execution_trace.txt").read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:] if line.strip()]


def labels(out) -> np.ndarray:
    """The full-resolution labels of the run folder ``out``."""
    return np.asarray(zarr.open_array(str(Path(out) / "labels.zarr" / "0"), mode="r")[...])


def zseg_run_with_flows(data: Path, out: Path) -> np.ndarray:
    """The segmentation -profile test makes of DATA (a `zseg synth` folder), by `zseg run` in this
    process with DATA's flows; returns the labels."""
    argv = ["run", str(data / "image.ome.zarr"), str(out), "--flows", str(data / "flows.zarr"), *TEST_SEGMENT]
    assert main(argv) == 0
    return labels(out)
