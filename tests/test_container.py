"""The image for real: built from the Dockerfile with podman (scripts/container/build.sh, which
scripts/test.sh runs before the tests where it can: root with Debian's podman, runc and
debootstrap), then zseg and the pipeline run inside it. In CI a missing image fails these tests;
elsewhere they are skipped.

podman runs through scripts/container/runc-no-rlimits, as this project's sandbox refuses
setrlimit; on other machines that wrapper changes nothing but the inherited limits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from tests import nextflow_text as NT
from tests.nextflow_run import TEST_SEGMENT, TEST_SYNTH, labels, nextflow_env, nextflow_run, trace, zseg_run_with_flows
from zseg import __version__
from zseg.cli import main

ROOT = NT.ROOT
IMAGE = f"localhost/zseg:{__version__}"
RUNTIME = ROOT / "scripts" / "container" / "runc-no-rlimits"


def _podman(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", "--runtime", str(RUNTIME), *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    why = None
    if shutil.which("podman") is None:
        why = "no podman here (apt-get install podman runc debootstrap, as root)"
    elif _podman("image", "exists", IMAGE).returncode != 0:
        why = f"no image {IMAGE}: bash scripts/container/build.sh builds it (log: ~/.cache/zseg/image-build.log)"
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return IMAGE


@pytest.fixture(scope="module")
def sandbox_config(tmp_path_factory) -> Path:
    """A Nextflow config that hands podman the runtime wrapper (nothing else)."""
    path = tmp_path_factory.mktemp("podman") / "sandbox.config"
    path.write_text(f"podman.engineOptions = '--runtime {RUNTIME}'\n")
    return path


def _user() -> str:
    return f"{os.getuid()}:{os.getgid()}"


@pytest.mark.slow
def test_image_runs_zseg_as_an_unprivileged_user(image):
    run = _podman("run", "--rm", image, "sh", "-c", "id -u; zseg --version; echo $CELLPOSE_LOCAL_MODELS_PATH")
    assert run.returncode == 0, run.stderr
    uid, version, models = run.stdout.split("\n")[:3]
    assert uid == "1000" and version == f"zseg {__version__}" and models == "/models"


@pytest.mark.slow
def test_the_demo_inside_the_image_gives_the_labels_of_zseg_here(image, tmp_path):
    """The network (the bundled demo) and every phase in the container, on a mounted folder: the
    labels equal those of `zseg run` in this environment."""
    assert main(["synth", str(tmp_path / "data"), *TEST_SYNTH]) == 0
    assert main(["run", str(tmp_path / "data" / "image.ome.zarr"), str(tmp_path / "here"), "--model", "zseg-demo",
                 *TEST_SEGMENT]) == 0
    script = (f"zseg run /w/data/image.ome.zarr /w/inside --model zseg-demo {' '.join(TEST_SEGMENT)} >/dev/null")
    run = _podman("run", "--rm", "-u", _user(), "-v", f"{tmp_path}:/w", image, "sh", "-c", script)
    assert run.returncode == 0, run.stderr
    want = labels(tmp_path / "here")
    assert want.max() > 3
    np.testing.assert_array_equal(labels(tmp_path / "inside"), want)


@pytest.mark.slow
def test_nextflow_profile_test_podman(image, sandbox_config, tmp_path):
    """`nextflow run main.nf -profile test,podman`: every task in the image, the labels of zseg run."""
    run = nextflow_run(tmp_path, "-profile", "test,podman", "-c", str(sandbox_config), "--outdir", str(tmp_path / "results"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert {r["status"] for r in trace(tmp_path)} == {"COMPLETED"}
    assert main(["synth", str(tmp_path / "synth"), *TEST_SYNTH]) == 0
    np.testing.assert_array_equal(labels(tmp_path / "results"), zseg_run_with_flows(tmp_path / "synth", tmp_path / "zseg"))


@pytest.mark.slow
def test_nextflow_podman_finds_a_model_by_name_in_the_mounted_model_folder(image, sandbox_config, tmp_path):
    """--model NAME with --models_dir: the tasks' containers see the folder (mounted at its own
    path), plan finds the weights there by name and predict runs them."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(resources.files("zseg").joinpath("data/zseg_demo_cp3.pt"), models / "my-demo")
    assert main(["synth", str(tmp_path / "data"), *TEST_SYNTH]) == 0
    run = nextflow_run(tmp_path, "-profile", "podman", "-c", str(sandbox_config), "--input", "data/image.ome.zarr",
                    "--model", "my-demo", "--models_dir", str(models), "--diameter", "12", "--chunk_shape", "8,24,24",
                    "--shard_size", "4", "--max_cpus", "1", "--outdir", "results")
    assert run.returncode == 0, run.stdout + run.stderr
    assert any("ZSEG_PREDICT" in r["name"] for r in trace(tmp_path))
    assert main(["run", str(tmp_path / "data" / "image.ome.zarr"), str(tmp_path / "here"), "--model", "zseg-demo",
                 *TEST_SEGMENT]) == 0
    want = labels(tmp_path / "here")
    assert want.max() > 3
    np.testing.assert_array_equal(labels(tmp_path / "results"), want)


def test_the_runtime_wrapper_drops_only_the_rlimits(tmp_path):
    """runc-no-rlimits edits the bundle's config.json (process.rlimits out, the rest kept) and
    hands every argument to the real runtime unchanged."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    config = {"process": {"args": ["sh"], "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]},
              "root": {"path": "rootfs"}}
    (bundle / "config.json").write_text(json.dumps(config))
    fake = tmp_path / "runc"
    fake.write_text("#!/bin/sh\necho \"$@\"\n")
    fake.chmod(0o755)
    run = subprocess.run([str(RUNTIME), "--root", "/run/x", "create", "--bundle", str(bundle), "id1"],
                         capture_output=True, text=True, env={**nextflow_env(), "ZSEG_RUNC": str(fake)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"--root /run/x create --bundle {bundle} id1"
    assert json.loads((bundle / "config.json").read_text()) == {"process": {"args": ["sh"]}, "root": {"path": "rootfs"}}
