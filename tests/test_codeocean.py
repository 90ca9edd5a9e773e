"""The Code Ocean capsule layout: code/run finds the input (and a models folder) in /data, writes
results to /results and intermediates to /scratch (moved here by ZSEG_CO_* to temporary
folders), and runs the pipeline under Nextflow with -profile codeocean."""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources

import numpy as np
import pytest

from tests import nextflow_text as NT
from tests.nextflow_run import TEST_SEGMENT, TEST_SYNTH, labels, nextflow_env
from zseg.cli import main

ROOT = NT.ROOT


def _capsule(tmp_path):
    folders = {name: tmp_path / name for name in ("data", "results", "scratch")}
    for folder in folders.values():
        folder.mkdir()
    env = {**nextflow_env(), **{f"ZSEG_CO_{name.upper()}": str(path) for name, path in folders.items()}}
    return folders, env


def _run(env, *args):
    return subprocess.run([str(ROOT / "code" / "run"), *args], env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_code_run_segments_the_image_in_data_with_the_models_there(nextflow, tmp_path):
    folders, env = _capsule(tmp_path)
    assert main(["synth", str(folders["data"] / "asset"), *TEST_SYNTH, "--no-flows"]) == 0
    (folders["data"] / "weights" / "models").mkdir(parents=True)
    shutil.copy(resources.files("zseg").joinpath("data/zseg_demo_cp3.pt"), folders["data"] / "weights" / "models" / "demo")
    run = _run(env, "--model", "demo", "--diameter", "12", "--chunk_shape", "8,24,24", "--shard_size", "4")
    assert run.returncode == 0, run.stdout + run.stderr
    assert (folders["results"] / "zseg" / "run.json").exists()
    assert (folders["results"] / "pipeline_info" / "execution_trace.txt").exists()
    assert (folders["scratch"] / "zseg_work").is_dir() and (folders["scratch"] / "work").is_dir()
    assert not (folders["results"] / "zseg" / "work").exists(), "intermediates stay in /scratch"
    assert main(["run", str(folders["data"] / "asset" / "image.ome.zarr"), str(tmp_path / "here"),
                 "--model", "zseg-demo", *TEST_SEGMENT]) == 0
    want = labels(tmp_path / "here")
    assert want.max() > 3
    np.testing.assert_array_equal(labels(folders["results"] / "zseg"), want)


@pytest.mark.parametrize("images, expect", [(0, "no image in"), (2, "2 images in")])
def test_code_run_refuses_data_without_one_image(tmp_path, images, expect):
    folders, env = _capsule(tmp_path)
    for i in range(images):
        (folders["data"] / f"v{i}.ome.zarr").mkdir()
    run = _run(env)
    assert run.returncode == 2
    assert run.stderr.startswith("zseg: error: ") and expect in run.stderr and run.stderr.count("\n") == 1, run.stderr
