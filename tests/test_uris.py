"""Stores as URIs of any fsspec file system: the whole pipeline on fsspec's in-memory file system
(the plumbing every object store goes through, gs:// included), and gs:// served by gcsfs."""

from __future__ import annotations

import fsspec
import gcsfs
import numpy as np
import pytest

from zseg.cli import main
from zseg.storage import uri as uris
from zseg.storage.arrays import open_array


@pytest.fixture
def memory():
    """fsspec's in-memory file system, emptied before and after the test."""
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs[:] = [""]
    yield fs
    fs.store.clear()
    fs.pseudo_dirs[:] = [""]


def test_a_run_on_memory_uris_equals_the_local_run(memory, tmp_path):
    src = tmp_path / "src"
    assert main(["synth", str(src), "--shape", "16,40,40", "--diameter", "10", "--seed", "1"]) == 0
    memory.put(str(src / "image.ome.zarr"), "/data/image.ome.zarr", recursive=True)
    memory.put(str(src / "flows.zarr"), "/data/flows.zarr", recursive=True)
    common = ["--diameter", "10", "--chunk-shape", "8,20,20", "--workers", "1"]
    assert main(["run", "memory://data/image.ome.zarr", "memory://res/out", "--flows", "memory://data/flows.zarr",
                 *common]) == 0
    assert main(["run", str(src / "image.ome.zarr"), str(tmp_path / "local"), "--flows", str(src / "flows.zarr"),
                 *common]) == 0
    got = np.asarray(open_array("memory://res/out/labels.zarr/0")[...])
    want = np.asarray(open_array(str(tmp_path / "local" / "labels.zarr" / "0"))[...])
    assert want.max() > 3
    np.testing.assert_array_equal(got, want)
    assert uris.exists("memory://res/out/cells.parquet")
    assert main(["verify", "memory://res/out"]) == 0
    assert not any(p.startswith("/data/image.ome.zarr/work") for p in memory.store), "the input is only read"


def test_a_missing_memory_input_is_refused(memory, tmp_path, refused):
    refused(["plan", "memory://nowhere/image.ome.zarr", "memory://res/out"], "does not exist")


def test_gs_uris_go_to_gcsfs():
    """-profile google keeps its stores on gs://: the protocol is gcsfs's, joined like any URI."""
    assert fsspec.get_filesystem_class("gs") is gcsfs.GCSFileSystem
    assert uris.is_remote("gs://bucket/run")
    assert uris.join("gs://bucket/run/", "labels.zarr", "0") == "gs://bucket/run/labels.zarr/0"
