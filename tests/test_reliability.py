"""Reliability (issue 7): S3 end to end, resume after SIGKILL, identical re-runs, `zseg verify`,
and every bad input of the README's table "What zseg says to bad input" (one test per row).

The volume is small (16 x 48 x 48 voxels, 18 chunks of 8 x 16 x 16) and segmented from its
exact flows, so a whole run takes about two seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from tests.s3proxy import FlakyProxy
from tests.volumes import write_volume
from zseg.cli import main
from zseg.engine.synth import flows_from_labels, synth_cells
from zseg.errors import UserError
from zseg.outputs.verify import verify_output
from zseg.params import build_params
from zseg.phases.plan import plan
from zseg.run.entry import run_local, run_phase
from zseg.storage.arrays import create_array, open_array
from zseg.storage.omezarr import write_ome_zarr
from zseg.workspace.chunks import chunk_ranges
from zseg.workspace.context import RunContext

SHAPE = (16, 48, 48)
CHUNK = (8, 16, 16)  # 2 x 3 x 3 = 18 chunks
NCHUNKS = 18
DIAMETER = 8.0
MARKER = re.compile(r"^c(\d{7})\.json$")


# -- data ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cells():
    image, labels = synth_cells(SHAPE, diameter=DIAMETER, seed=7)
    return image, flows_from_labels(labels)


@pytest.fixture(scope="module")
def data(cells, tmp_path_factory):
    return write_volume(str(tmp_path_factory.mktemp("data")), *cells)


def argv(data: dict, out, *extra: str) -> list[str]:
    """The `zseg run` arguments of the reference run (and of the killed and resumed ones)."""
    return ["run", data["image"], str(out), "--flows", data["flows"], "--diameter", str(DIAMETER),
            "--chunk-shape", ",".join(map(str, CHUNK)), *extra]


def labels_of(out) -> np.ndarray:
    return np.asarray(open_array(f"{out}/labels.zarr/{_segmented(out)}")[...])


def _segmented(out) -> str:
    from zseg.outputs.verify import _segmented_path

    return _segmented_path(RunContext.open(str(out)))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted run on local files: its output folder and labels."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(argv(data, out)) == 0
    labels = labels_of(out)
    assert labels.max() > 50  # a real segmentation, not an empty one
    return out, labels


def fresh_copy(reference, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    return out


# -- S3 end to end -----------------------------------------------------------------------------------
@pytest.mark.s3
@pytest.mark.slow
def test_s3_run_equals_the_same_run_on_local_files(s3_server, cells, tmp_path):
    """Input, flows, output and work all on S3 (moto on 127.0.0.1) give the local run's labels."""
    opts = ["--diameter", str(DIAMETER), "--chunk-shape", "16,24,24", "--workers", "2"]  # 4 chunks: moto is slow
    local = write_volume(str(tmp_path), *cells)
    assert main(["run", local["image"], str(tmp_path / "out"), "--flows", local["flows"], *opts]) == 0
    remote = write_volume(f"{s3_server}/e2e", *cells)
    out, work = f"{s3_server}/e2e/out", f"{s3_server}/e2e-work"
    assert main(["run", remote["image"], out, "--flows", remote["flows"], "--work", work, *opts]) == 0
    np.testing.assert_array_equal(labels_of(out), labels_of(tmp_path / "out"))
    assert verify_output(out)["ok"]
    from zseg.storage.uri import exists

    assert exists(f"{work}/ends.zarr") and not exists(f"{out}/work")  # --work honoured on S3
    from zseg.storage.uri import read_bytes

    manifest = read_bytes(f"{out}/run.json").decode()
    for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # credentials never reach the outputs
        assert os.environ[secret] not in manifest


# -- resume after SIGKILL --------------------------------------------------------------------------
SLOW = textwrap.dedent('''
    # Test-only (sitecustomize): ZSEG_TEST_SLOW="STAGE=SECONDS[=FILE]" slows stage STAGE so that a
    # SIGKILL lands inside it. A map stage sleeps after each chunk's data and before its marker; a
    # reduce sleeps just before it writes FILE (its result by default), after touching
    # ZSEG_TEST_FLAG, so the test knows the reduce has written everything else.
    import os, time
    _slow = os.environ.get("ZSEG_TEST_SLOW")
    if _slow:
        import zseg.run.tasks as _tasks
        from zseg.storage import uri as _U
        from zseg.workspace.stages import SLIDE_STAGES as _SLIDE, STAGES as _STAGES
        _name, _delay, *_file = _slow.split("=")
        _stage, _delay = {**_STAGES, **_SLIDE}[_name], float(_delay)
        if _stage.kind == "map" and _name in _tasks.BATCHES:
            def _batch(run, indices, _fn=_tasks.BATCHES[_name]):
                for item in _fn(run, indices):
                    time.sleep(_delay)
                    yield item
            _tasks.BATCHES[_name] = _batch
        elif _stage.kind == "map":
            def _slowly(run, index, _fn=_tasks.FUNCTIONS[_name]):
                out = _fn(run, index)
                time.sleep(_delay)
                return out
            _tasks.FUNCTIONS[_name] = _slowly
        else:
            _target, _inside = (_file[0] if _file else _stage.result), []
            def _reduce(run, _fn=_tasks.FUNCTIONS[_name]):
                _inside.append(True)
                return _fn(run)
            def _write(uri, data, _fn=_U.write_bytes):
                if _inside and str(uri).endswith("/" + _target):
                    open(os.environ["ZSEG_TEST_FLAG"], "w").close()
                    time.sleep(_delay)
                return _fn(uri, data)
            _tasks.FUNCTIONS[_name], _U.write_bytes = _reduce, _write
''')


def _markers(out: Path, stage_dir: str) -> list[int]:
    d = out / "work" / stage_dir
    return sorted(int(m.group(1)) for m in map(MARKER.match, os.listdir(d)) if m) if d.exists() else []


def kill_inside(cmd: list[str], tmp_path: Path, stage: str, ready, *, file: str | None = None, delay: float = 0.25,
                timeout: float = 180) -> None:
    """Start ``cmd`` with ``stage`` (a volume's or a slide's) slowed down (``SLOW``), SIGKILL it
    once ``ready()`` holds."""
    from zseg.workspace.stages import SLIDE_STAGES, STAGES

    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SLOW)
    flag = tmp_path / "flag"
    flag.unlink(missing_ok=True)
    if {**STAGES, **SLIDE_STAGES}[stage].kind == "reduce":
        delay, ready = 60.0, flag.exists
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p),
           "ZSEG_TEST_SLOW": "=".join([stage, str(delay), *([file] if file else [])]), "ZSEG_TEST_FLAG": str(flag)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
            assert time.monotonic() < deadline, f"{stage} never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


#: Every stage of a volume run segmented from given flows (predict and the stitch-mode stages
#: have their own tests), with the file its reduce is killed before (its result by default; the
#: report stage's commit is run.json's complete flag, written before its result).
KILLED = [("percentiles", None), ("percentiles:reduce", None), ("seeds:follow", None), ("seeds:find", None),
          ("number", None), ("masks", None), ("finalize:sizes", None), ("finalize:holes", None), ("finalize:number", None),
          ("finalize:labels", None), ("finalize:cells", None), ("finalize:report", "run.json")]


@pytest.mark.slow
@pytest.mark.parametrize("stage, file", KILLED)
def test_killed_run_resumes_to_identical_labels(data, reference, tmp_path, stage, file):
    """`zseg run` killed by SIGKILL inside a stage, then the same command again: the same labels
    and table, byte for byte, and the summary lists what it skipped."""
    kill_and_resume(data, reference, tmp_path, stage, file)


STITCH = ("--stitch-threshold", "0.25", "--halo", "0,32,32")


def _reference_with(data, tmp_path_factory, name: str, extra) -> tuple[Path, np.ndarray]:
    """An uninterrupted run with the options ``extra``: its folder and labels."""
    out = tmp_path_factory.mktemp(name) / "out"
    assert main(argv(data, out, *extra)) == 0
    return out, labels_of(out)


@pytest.fixture(scope="module")
def stitch_reference(data, tmp_path_factory):
    return _reference_with(data, tmp_path_factory, "stitch", STITCH)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["finalize:extent", "finalize:quality", "finalize:overlaps", "finalize:stitch"])
def test_killed_stitch_mode_run_resumes_to_identical_labels(data, stitch_reference, tmp_path, stage):
    """The stages of stitch mode (and of its 2D flow check) killed and resumed."""
    kill_and_resume(data, stitch_reference, tmp_path, stage, None, STITCH)


NO_RESAMPLE = ("--no-resample",)


@pytest.fixture(scope="module")
def no_resample_reference(data, tmp_path_factory):
    return _reference_with(data, tmp_path_factory, "noresample", NO_RESAMPLE)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["seeds:follow", "masks", "masks:own", "masks:resize"])
def test_killed_no_resample_run_resumes_to_identical_labels(data, no_resample_reference, tmp_path, stage):
    """A --no-resample run killed in a stage of the network grid or in one of the two that bring
    the masks back, then resumed."""
    kill_and_resume(data, no_resample_reference, tmp_path, stage, None, NO_RESAMPLE)


def kill_and_resume(data, reference, tmp_path: Path, stage: str, file, extra=()) -> None:
    from zseg.workspace.stages import STAGES

    st = STAGES[stage]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "zseg", *argv(data, out, *extra)]
    kill_inside(cmd, tmp_path, stage, lambda: 2 <= len(_markers(out, st.marker_dir)) <= NCHUNKS - 4, file=file)
    if st.kind == "map":
        done = _markers(out, st.marker_dir)
        assert 2 <= len(done) < NCHUNKS
    else:
        assert not (out / "work" / st.result).exists()
    assert not json.loads((out / "run.json").read_text())["complete"]
    assert verify_fails(out, "not finished")

    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    if st.kind == "map":
        assert report["skipped"][stage] == chunk_ranges(done)
        assert f"{stage} {chunk_ranges(done)}" in again.stderr
    else:
        assert stage not in report["skipped"]
    if stage != "percentiles":
        assert report["skipped"]["percentiles"] == f"0-{NCHUNKS - 1}"
    assert "resumed" in again.stderr
    np.testing.assert_array_equal(labels_of(out), reference[1])
    assert same_table(out, reference[0])
    assert verify_output(str(out))["ok"]


def same_table(out: Path, ref: Path) -> bool:
    """The cell tables of two runs are the same: every value, and the metadata but the folder it names."""
    import pyarrow.parquet as pq

    a, b = pq.read_table(out / "cells.parquet"), pq.read_table(ref / "cells.parquet")
    meta = {k: v.replace(str(out).encode(), str(ref).encode()) for k, v in a.schema.metadata.items()}
    return a.equals(b) and meta == b.schema.metadata


def verify_fails(out, *expect) -> list[str]:
    with pytest.raises(UserError) as e:
        verify_output(str(out))
    text = "\n".join(e.value.problems)
    for x in expect:
        assert x in text, text
    return e.value.problems


# -- re-running a task -------------------------------------------------------------------------------
def _files(root: Path) -> dict[str, bytes]:
    """Every file but the per-chunk markers (they record the task's time and memory)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not MARKER.match(p.name) and ".partial" not in p.name}


def test_rerunning_a_chunk_gives_identical_bytes(reference, tmp_path):
    out = fresh_copy(reference, tmp_path)
    before = _files(out)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    run = RunContext.open(str(out))
    from zseg.workspace.stages import STAGES

    k = 4
    maps = [s for s in STAGES.values() if s.kind == "map" and s.applies(run)]
    for s in maps:
        (out / "work" / s.marker_dir / f"c{k:07d}.json").unlink()
    for s in maps:
        phase, _, sub = s.name.partition(":")
        r = run_phase(str(out), phase, stage=sub or None, chunks=str(k))
        assert r["ran"] == [k], (s.name, r)
    after = _files(out)
    assert after.keys() == before.keys()
    changed = [name for name in before if before[name] != after[name]]
    assert changed == []
    # the tasks really wrote again: chunk k's objects in the labels and the work arrays are new files
    rewritten = {str(p.relative_to(out)) for p, t in stamps.items() if p.exists() and p.stat().st_mtime_ns != t}
    for store in ("labels.zarr", "work/ends.zarr", "work/masks.zarr"):
        assert any(name.startswith(store + "/") and not name.endswith("zarr.json") for name in rewritten), store
    assert verify_output(str(out))["ok"]


# -- finalize refuses while chunks are missing -------------------------------------------------------
def test_finalize_refuses_while_chunks_are_incomplete_and_lists_them(data, tmp_path, capsys, refused):
    out = str(tmp_path / "o")
    plan(build_params(input=data["image"], output=out, flows=data["flows"], diameter=DIAMETER, chunk_shape=CHUNK))
    for phase, stage, reduce in (("percentiles", None, False), ("percentiles", None, True),
                                 ("seeds", "follow", False), ("seeds", "find", False), ("number", None, True)):
        run_phase(out, phase, stage=stage, reduce=reduce)
    run_phase(out, "masks", chunks="0-9,12")
    err = refused(["finalize", "--run", out, "--stage", "sizes"],
                  "finalize:sizes cannot start", "7 of 18 chunk(s) of masks are not done (10-11,13-17)",
                  f"zseg masks --run {out}")
    for stage in ("labels", "report"):
        refused(["finalize", "--run", out, "--stage", stage], f"finalize:{stage} cannot start",
                "masks are not done (10-11,13-17)")
    # a map task of a later stage is refused too (it would read a half-made input)
    refused(["finalize", "--run", out, "--stage", "labels", "--chunks", "0"], "cannot start")
    assert not (Path(out) / "labels.zarr").exists() and not (Path(out) / "work" / "sizes").exists()
    assert "masks" in err[0]
    run_phase(out, "masks")
    for stage in ("sizes", "holes", "number", "labels"):
        assert main(["finalize", "--run", out, "--stage", stage]) == 0
    capsys.readouterr()
    stages = [n.split(":")[1] for n in _later_finalize_stages(out)]
    for stage in stages:
        assert main(["finalize", "--run", out, "--stage", stage]) == 0, capsys.readouterr().err
    assert verify_output(out)["ok"]


def _later_finalize_stages(out) -> list[str]:
    from zseg.workspace.stages import STAGES

    names = [n for n in STAGES if n.startswith("finalize:")]
    return names[names.index("finalize:labels") + 1:]


# -- zseg verify -------------------------------------------------------------------------------------
def test_verify_accepts_a_finished_run(reference, capsys):
    capsys.readouterr()
    assert main(["verify", str(reference[0])]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] and summary["cells"] == int(reference[1].max()) and summary["digests_checked"]


def _stored_chunks(out: Path) -> list[Path]:
    level = out / "labels.zarr" / _segmented(out)
    return sorted(p for p in (level / "c").rglob("*") if p.is_file())


def test_verify_finds_a_missing_chunk(reference, tmp_path, refused):
    out = fresh_copy(reference, tmp_path)
    _stored_chunks(out)[5].unlink()
    refused(["verify", str(out)], "differ from what the run wrote", "missing or was changed", lines=None)


def test_verify_finds_a_corrupt_chunk(reference, tmp_path, refused):
    out = fresh_copy(reference, tmp_path)
    victim = _stored_chunks(out)[3]
    victim.write_bytes(victim.read_bytes()[:20])
    key = victim.relative_to(out / "labels.zarr" / _segmented(out)).as_posix()
    refused(["verify", str(out)], "cannot be read", key, "truncated or corrupt", lines=None)


def test_verify_finds_changed_labels_and_a_wrong_cell_count(reference, tmp_path, refused):
    out = fresh_copy(reference, tmp_path)
    arr = zarr.open_array(str(out / "labels.zarr" / _segmented(out)), mode="r+")
    block = arr[0:8, 0:16, 0:16]
    block[block == block.max()] = 0  # a cell's voxels in chunk 0 are lost
    arr[0:8, 0:16, 0:16] = block
    err = refused(["verify", str(out)], "(0)", lines=None)
    assert any("differ" in e for e in err)
    out2 = fresh_copy(reference, tmp_path / "b")
    manifest = json.loads((out2 / "run.json").read_text())
    manifest["result"]["cells"] += 3
    (out2 / "run.json").write_text(json.dumps(manifest))
    refused(["verify", str(out2)], "3 of the IDs", lines=None)


def test_verify_finds_broken_metadata(reference, tmp_path, refused):
    out = fresh_copy(reference, tmp_path)
    meta_file = out / "labels.zarr" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    del meta["attributes"]["ome"]["multiscales"]
    meta_file.write_text(json.dumps(meta))
    refused(["verify", str(out)], "multiscales", lines=None)


def test_verify_lists_what_an_unfinished_run_lacks(data, tmp_path, refused):
    out = str(tmp_path / "o")
    plan(build_params(input=data["image"], output=out, flows=data["flows"], diameter=DIAMETER, chunk_shape=CHUNK))
    run_phase(out, "percentiles", chunks="0-4")
    err = refused(["verify", out], "not finished", "percentiles: 13 of 18 chunk(s) not done (5-17)", lines=None)
    assert len(err) >= 3


def test_verify_refuses_a_folder_that_is_not_a_run(tmp_path, refused):
    refused(["verify", str(tmp_path)], "not a zseg output folder")


# -- bad input: the README table, row by row ---------------------------------------------------------
def _nothing_written(out: Path):
    assert not out.exists() or not (out / "labels.zarr").exists()


def test_bad_nan_voxels_in_the_image(cells, tmp_path, refused):
    image, flows = cells
    bad = image.astype(np.float32)
    bad[3, 20, 30] = np.nan
    bad[12, 40, 40] = np.inf
    d = write_volume(str(tmp_path), bad, flows)
    out = tmp_path / "o"
    refused(argv(d, out), "percentiles, chunk", "NaN or infinite")
    _nothing_written(out)
    assert not json.loads((out / "run.json").read_text())["complete"]


def test_bad_nan_in_the_flows(cells, tmp_path, refused):
    image, flows = cells
    bad = flows.copy()
    bad[1, 9, 30, 30] = np.nan
    d = write_volume(str(tmp_path), image, bad)
    out = tmp_path / "o"
    refused(argv(d, out), "seeds:follow, chunk 0 (z 0:8, y 0:16, x 0:16)", "NaN or infinite")
    _nothing_written(out)


def test_bad_all_zero_volume_is_a_valid_empty_result(tmp_path, capsys):
    d = write_volume(str(tmp_path), np.zeros(SHAPE, np.uint16), np.zeros((4, *SHAPE), np.float32))
    out = tmp_path / "o"
    assert main(argv(d, out)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cells"] == 0
    assert not labels_of(out).any()
    assert verify_output(str(out))["cells"] == 0


@pytest.mark.parametrize("which", ["image", "flows"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_bad_damaged_zarr_chunk(cells, tmp_path, refused, which, damage):
    d = write_volume(str(tmp_path), *cells)
    array = Path(d[which]) / ("0" if which == "image" else "")
    victim = sorted(p for p in (array / "c").rglob("*") if p.is_file())[4]
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"not a zstd frame" * 4)
    key = victim.relative_to(array).as_posix()
    out = tmp_path / "o"
    err = refused(argv(d, out), "truncated or corrupt", key, str(array).rstrip("/"))
    assert "Traceback" not in err[0]
    _nothing_written(out)


@pytest.mark.parametrize("dtype", ["bool", "complex64", "uint64"])
def test_bad_image_dtype(tmp_path, refused, dtype):
    src = str(tmp_path / "v.zarr")
    create_array(src, shape=SHAPE, chunks=CHUNK, dtype=dtype)
    out = tmp_path / "o"
    refused(["plan", src, str(out)], "data type", dtype, "supported")
    assert not out.exists()


@pytest.mark.parametrize("dtype", ["int16", "complex64", "bool"])
def test_bad_flows_dtype(cells, tmp_path, refused, dtype):
    d = write_volume(str(tmp_path), cells[0])
    flows = str(tmp_path / "iflows.zarr")
    create_array(flows, shape=(4, *SHAPE), chunks=(4, *CHUNK), dtype=dtype)
    out = tmp_path / "o"
    refused(["run", d["image"], str(out), "--flows", flows], dtype, "floating point")
    assert not out.exists()


def test_bad_flows_of_another_shape(cells, tmp_path, refused):
    d = write_volume(str(tmp_path), cells[0])
    flows = str(tmp_path / "sflows.zarr")
    create_array(flows, shape=(4, SHAPE[0], SHAPE[1], SHAPE[2] - 2), chunks=(4, *CHUNK), dtype="float32")
    out = tmp_path / "o"
    refused(["run", d["image"], str(out), "--flows", flows], "has shape (4, 16, 48, 46)", "(4, 16, 48, 48)")
    assert not out.exists()


def test_bad_hundreds_of_channels(tmp_path, refused):
    """A 120-channel stack: one line that names the first and last channels, not all 120."""
    tifffile.imwrite(tmp_path / "many.tif", np.zeros((120, 4, 16, 16), np.uint16), metadata={"axes": "CZYX"},
                     photometric="minisblack")
    out = tmp_path / "o"
    err = refused(["run", str(tmp_path / "many.tif"), str(out)], "has 120 channels", "..., 118, 119", "--channels")
    assert len(err[0]) < 300 and not out.exists()


def test_bad_tiff_whose_ome_xml_disagrees_with_its_pages(tmp_path, refused):
    """OME-XML says 12 planes, the file holds 8: tifffile would zero the missing 4; zseg refuses."""
    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
           '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYZCT" Type="uint16" SizeX="32" SizeY="32" '
           'SizeZ="12" SizeC="1" SizeT="1"><Channel ID="Channel:0:0" SamplesPerPixel="1"/><TiffData/></Pixels>'
           '</Image></OME>')
    tifffile.imwrite(tmp_path / "liar.tif", np.ones((8, 32, 32), np.uint16), description=xml, metadata=None)
    out = tmp_path / "o"
    refused(["run", str(tmp_path / "liar.tif"), str(out)], "describes 12 image planes", "holds 8")
    assert not out.exists()


def test_paths_with_spaces_and_non_ascii_letters_work(cells, tmp_path):
    d = write_volume(str(tmp_path / "a folder é"), *cells)
    out = tmp_path / "résultats 1"
    assert main(["run", d["image"], str(out), "--flows", d["flows"], "--chunk-shape", "8,24,24"]) == 0
    assert verify_output(str(out))["ok"]


def test_overwrite_never_deletes_through_a_symlink_in_the_output(data, tmp_path):
    """An output folder whose work/ was replaced by a link to another folder: --overwrite removes
    the link, never what it points to."""
    out = tmp_path / "o"
    assert main(["run", data["image"], str(out), "--flows", data["flows"], "--chunk-shape", "8,24,24"]) == 0
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    shutil.rmtree(out / "work")
    (out / "work").symlink_to(victim, target_is_directory=True)
    assert main(["run", data["image"], str(out), "--flows", data["flows"], "--chunk-shape", "8,24,24",
                 "--overwrite"]) == 0
    assert (victim / "keep.txt").read_text() == "mine" and not (out / "work").is_symlink()


def test_bad_s3_uri_without_credentials(tmp_path, refused, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    out = tmp_path / "o"
    refused(["run", "s3://zseg-no-such-bucket/image.ome.zarr", str(out)], "no AWS credentials", "AWS_PROFILE")
    assert not out.exists()


def test_bad_single_plane(cells, tmp_path, refused):
    """A one-plane volume is a 2D image: refused for the network, segmented from given flows."""
    image, flows = cells
    src = str(tmp_path / "one.ome.zarr")
    write_ome_zarr(src, image[5:6], axes="zyx", voxel_size=(1.0, 1.0, 1.0), chunks=(1, 16, 16))
    out = tmp_path / "o"
    refused(["plan", src, str(out)], "single z plane", "2D")
    assert not out.exists()
    f = str(tmp_path / "one_flows.zarr")
    create_array(f, shape=(4, 1, *SHAPE[1:]), chunks=(4, 1, 16, 16), dtype="float32")[...] = flows[:, 5:6]
    assert main(["run", src, str(out), "--flows", f, "--diameter", "8", "--chunk-shape", "1,16,16"]) == 0
    assert labels_of(out).max() > 10
    assert verify_output(str(out))["ok"]


def test_bad_huge_diameter_clips_the_halo_and_stays_chunk_exact(data, tmp_path, capsys, caplog):
    """A halo (2 x diameter) larger than the volume is clipped: every block is the whole volume."""
    common = ["--diameter", "100", "--niter", "40"]
    whole = argv(data, tmp_path / "whole", *common)
    whole[whole.index("--chunk-shape") + 1] = ",".join(map(str, SHAPE))
    assert main(whole) == 0
    with caplog.at_level("WARNING"):
        assert main(argv(data, tmp_path / "chunked", *common)) == 0
    assert "larger than the volume" in caplog.text
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["chunk_exact"]
    np.testing.assert_array_equal(labels_of(tmp_path / "chunked"), labels_of(tmp_path / "whole"))
    assert RunContext.open(str(tmp_path / "chunked")).grid.halo == (200, 200, 200)


def _planned(data, tmp_path) -> str:
    out = str(tmp_path / "o")
    plan(build_params(input=data["image"], output=out, flows=data["flows"], diameter=DIAMETER, chunk_shape=CHUNK))
    return out


def test_bad_manifest_invalid_json(data, tmp_path, refused):
    out = _planned(data, tmp_path)
    path = Path(out) / "run.json"
    path.write_text(path.read_text()[:200])
    refused(["percentiles", "--run", out], "run.json", "not valid JSON", "--overwrite")
    refused(argv(data, out), "not valid JSON")


@pytest.mark.parametrize("edit, expect", [
    (lambda m: m["params"].update(diameter=-1), "params.diameter = -1"),
    (lambda m: m["grid"].update(nchunks=5), "nchunks 5 do not follow"),
    (lambda m: m["grid"].update(chunk_shape=[8, "16", 16]), "grid.chunk_shape"),
    (lambda m: m["grid"].update(shape=[16, 48, 49], grid_shape=[2, 3, 4], nchunks=24), "not the input's shape"),
    (lambda m: m.update(niter=0), "niter = 0"),
    (lambda m: m.update(complete="yes"), "complete = 'yes'"),
    (lambda m: m.pop("grid"), "grid missing"),
    (lambda m: m["params"].update(surprise=1), "params.surprise"),
], ids=["bad-value", "inconsistent-grid", "wrong-type", "grid-vs-input", "niter", "complete", "missing", "unknown-key"])
def test_bad_manifest_values(data, tmp_path, refused, edit, expect):
    out = _planned(data, tmp_path)
    path = Path(out) / "run.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    err = refused(["seeds", "--run", out, "--stage", "follow"], expect, "edited or damaged", lines=None)
    assert 1 <= len(err) <= 3
    assert not (Path(out) / "work" / "follow").exists()


def test_bad_output_folder_of_another_run(data, reference, tmp_path, refused):
    # a finished run is never overwritten without --overwrite
    out = fresh_copy(reference, tmp_path)
    before = _files(out)
    refused(argv(data, out), "already holds a finished run", "--overwrite")
    assert _files(out) == before
    # an unfinished run with other parameters is not resumed
    other = _planned(data, tmp_path)
    run_phase(other, "percentiles", chunks="0-3")
    refused(argv(data, other, "--min-size", "40"), "unfinished run with other parameters", "min_size")
    assert sorted(p.name for p in (Path(other) / "work" / "percentiles").glob("*.json")) == \
        [f"c{i:07d}.json" for i in range(4)]
    # any other folder
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    refused(argv(data, foreign), "not a zseg run folder", "--overwrite")
    assert (foreign / "holiday.jpg").read_bytes() == b"\xff\xd8"
    # --overwrite with a bad input is refused before the old run is touched
    bad = argv(data, out, "--overwrite")
    bad[bad.index("--flows") + 1] = data["image"] + "/0"  # not flows: the image array
    refused(bad, "flow store", "floating point")
    assert _files(out) == before
    # with --overwrite the finished run is replaced by a new one
    assert main(argv(data, out, "--overwrite", "--min-size", "40")) == 0
    assert RunContext.open(str(out)).params.min_size == 40


def test_paths_from_a_manifest_cannot_send_writes_elsewhere(data, tmp_path, refused):
    """Outputs go under the folder the user named; only the user's own --work may lie outside."""
    out = _planned(data, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    path = Path(out) / "run.json"
    manifest = json.loads(path.read_text())
    manifest["params"]["output"] = str(elsewhere)
    path.write_text(json.dumps(manifest))
    assert RunContext.open(out).params.output == out
    assert RunContext.open(out).work == os.path.join(out, "work")
    for phase, stage, reduce in (("percentiles", None, False), ("percentiles", None, True),
                                 ("seeds", "follow", False), ("seeds", "find", False), ("number", None, True),
                                 ("masks", None, False)):
        run_phase(out, phase, stage=stage, reduce=reduce)
    from zseg.workspace.stages import STAGES

    for name in [n for n in STAGES if n.startswith("finalize:")]:
        st = STAGES[name]
        run_phase(out, "finalize", stage=name.split(":")[1], reduce=st.kind == "reduce")
    assert not elsewhere.exists()
    assert (Path(out) / "labels.zarr").exists()
    # chunk indices and stage names come from the code and the grid, never as paths
    refused(["masks", "--run", out, "--chunks", "18"], "outside 0-17")
    refused(["masks", "--run", out, "--chunks", "../../x"], "not an index")
    refused(["seeds", "--run", out, "--stage", "../../follow"], "not a stage")


def test_user_given_work_folder_elsewhere_is_honoured(data, tmp_path):
    out, work = tmp_path / "o", tmp_path / "scratch" / "w"
    run_local(build_params(input=data["image"], output=str(out), flows=data["flows"], work=str(work),
                           diameter=DIAMETER, chunk_shape=(16, 48, 48)))
    assert (work / "ends.zarr").exists() and not (out / "work").exists()
    assert verify_output(str(out))["ok"]


def test_corrupt_work_chunk_is_named(reference, tmp_path, refused):
    """A damaged intermediate names its store and chunk (and how to redo it)."""
    out = fresh_copy(reference, tmp_path)
    victim = sorted((out / "work" / "masks.zarr" / "c").rglob("*"))
    victim = [p for p in victim if p.is_file()][2]
    victim.write_bytes(b"\x00" * 7)
    (out / "work" / "labels" / "c0000002.json").unlink()
    refused(["finalize", "--run", str(out), "--stage", "labels", "--chunks", "2"],
            "finalize:labels, chunk 2", "masks.zarr", "truncated or corrupt")


# -- weights and Nextflow ------------------------------------------------------------------------------
def test_weights_are_loaded_without_executing_code():
    """Every torch.load in the package passes weights_only=True (a pickle cannot run code)."""
    root = Path(__file__).resolve().parents[1] / "python" / "zseg"
    calls = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((path.name, text[m.start():i]))
    for name, call in calls:
        assert re.search(r"weights_only\s*=\s*True", call), f"{name}: {call}"
    assert not re.search(r"\bpickle\.loads?\(", "\n".join(p.read_text() for p in root.rglob("*.py")))



class _Payload:
    """A pickle that runs code when loaded: it creates the file ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_weights_file_that_runs_code_is_refused_without_running_it(tmp_path, capsys):
    """The model loader reads weights with torch.load(weights_only=True): a pickle that would
    execute code is refused with one line, and its code never runs."""
    torch = pytest.importorskip("torch")
    models = pytest.importorskip("zseg.storage.models")  # issue 4's loader
    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pt"
    torch.save({"W2": torch.zeros(2), "evil": _Payload(str(marker))}, weights)
    with pytest.raises(UserError) as e:
        models.inspect_model(str(weights), download=False)
    assert not marker.exists()
    assert len(e.value.problems) == 1 and "not a readable Cellpose weights file" in e.value.problems[0]
    with pytest.raises(UserError):
        models.load_network(weights, torch.device("cpu"))
    assert not marker.exists()
    # the same file does run code when loaded the unsafe way: the test's payload is real
    torch.load(weights, weights_only=False)
    assert marker.exists()

# Every ${...} a process puts into its shell script is one of these. Numbers need no quoting; a
# value between single quotes is safe when it cannot hold a single quote, which main.nf ensures
# for the parameters it comes from; the plan task's JSON sits in a here-document whose quoted
# delimiter keeps the shell from reading it (and JSON has no raw line break to end it); task.ext.args
# holds the pipeline operator's extra words from a config file, split by the shell on purpose.
NUMBERS = {"task.cpus", "index", "count"}
SINGLE_QUOTED = {"meta.run": "outdir", "input": "input", "flows": "flows", "shape": "synth"}
HEREDOC = {"json": "ZSEG_PARAMS"}
CONFIG_WORDS = {"args"}
#: Values no user types: Nextflow's session id (a UUID: hex digits and dashes).
NEXTFLOWS_OWN = {"meta.session"}


def shell_interpolations(template: str) -> list[tuple[str, str]]:
    """``(expression, context)`` of each Groovy ``${...}`` in a shell template; context is where the
    shell sees it: ``single`` or ``double`` quoted, or ``none``."""
    from tests import nextflow_text as NT

    out, state, i = [], None, 0
    while i < len(template):
        if template.startswith("${", i):
            m = NT._INTERP.match(template, i)
            out.append((m.group(1).strip(), state or "none"))
            i = m.end()
            continue
        c = template[i]
        if c == "\\" and state != "single":
            i += 2
            continue
        if state is None and c in "'\"":
            state = "single" if c == "'" else "double"
        elif (state == "single" and c == "'") or (state == "double" and c == '"'):
            state = None
        i += 1
    return out


def _check_quoting(where_from: str, template: str, defs: dict[str, str]) -> int:
    """Apply the rules above to every ${...} of ``template``; a local ``def name = ...`` of the
    script block used unquoted is checked through its own string literals. Returns the count."""
    bare = re.findall(r"(?<![\\$])\$(?![{(])\w+", template)
    assert not bare, f"{where_from}: write ${{...}} so it can be checked, not {bare}"
    checked = 0
    for expr, where in shell_interpolations(template):
        checked += 1
        if expr in NUMBERS:
            continue
        if expr in HEREDOC:
            tag = HEREDOC[expr]
            assert f"<<'{tag}'\n    ${{{expr}}}\n    {tag}\n" in template or f"<<'{tag}'\n${{{expr}}}\n{tag}\n" in template, \
                f"{where_from}: ${{{expr}}} must be the one line of a <<'{tag}' here-document"
            continue
        if where == "single":
            assert expr in SINGLE_QUOTED or expr in NEXTFLOWS_OWN, f"{where_from}: '${{{expr}}}' comes from an unchecked value"
        elif where == "none":
            if expr in defs and expr not in CONFIG_WORDS:
                literals = re.findall(r'"((?:[^"\\]|\\.)*)"', defs[expr])
                assert literals or re.fullmatch(r"\s*''\s*", defs[expr]), f"{where_from}: {expr} = {defs[expr]}"
                for lit in literals:
                    checked += _check_quoting(f"{where_from} ({expr})", lit, {})
                continue
            assert expr in NUMBERS | CONFIG_WORDS, \
                f"{where_from}: ${{{expr}}} reaches the shell unquoted; put it in single quotes"
        else:
            pytest.fail(f"{where_from}: ${{{expr}}} is inside double quotes, where the shell expands $ and `")
    return checked


def test_nextflow_scripts_quote_every_parameter_they_pass_to_the_shell():
    from tests import nextflow_text as NT

    procs = NT.processes()
    assert procs
    checked = 0
    for name, proc in procs.items():
        defs = dict(re.findall(r"^\s*def\s+(\w+)\s*=\s*(.+?)\s*$", proc.script_groovy, re.M))
        checked += _check_quoting(f"{name} script", proc.script, defs)
        checked += _check_quoting(f"{name} stub", proc.stub or "", {})
    assert checked > 20


def test_nextflow_refuses_parameters_that_could_break_the_quoting():
    """main.nf refuses a quote or a line break in every parameter that ends up single-quoted."""
    main_nf = (Path(__file__).resolve().parents[1] / "main.nf").read_text()
    m = re.search(r"\[([^\]]*)\]\.each \{ name ->\s*\n\s*if \(params\[name\] && params\[name\]\.toString\(\) =~ /\['\\n\\r\]/\)",
                  main_nf)
    assert m, "the quote guard is missing from main.nf"
    guarded = set(re.findall(r"'(\w+)'", m.group(1)))
    assert set(SINGLE_QUOTED.values()) <= guarded
    plan_nf = (Path(__file__).resolve().parents[1] / "modules/local/plan/main.nf").read_text()
    assert "cat > nextflow_params.json <<'ZSEG_PARAMS'" in plan_nf  # every other parameter travels as JSON


@pytest.mark.parametrize("template, expect", [
    ("zseg plan '${input}' --x ${task.cpus}", [("input", "single"), ("task.cpus", "none")]),
    ('echo "${meta.run}" ${args}', [("meta.run", "double"), ("args", "none")]),
    ("echo 'it''s' ${flows} \\'${x}", [("flows", "none"), ("x", "none")]),
])
def test_the_quote_checker_sees_what_the_shell_sees(template, expect):
    assert shell_interpolations(template) == expect


@pytest.mark.parametrize("template, defs", [
    ("zseg plan ${input}", {}),  # unquoted value
    ('zseg plan "${input}"', {}),  # double quotes: the shell still expands $(...) in it
    ("zseg plan '${meta.secret}'", {}),  # quoted, but from a value main.nf does not check
    ("zseg plan ${flag}", {"flag": 'flows ? "--flows ${flows}" : \'\''}),  # a helper that does not quote
    ("zseg plan $input", {}),  # bare $name: not checkable
])
def test_the_quote_checker_refuses_unsafe_scripts(template, defs):
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        _check_quoting("t", template, defs)


# -- a killed predict resumes to the same flows ------------------------------------------------------
@pytest.fixture(scope="module")
def network_run(tmp_path_factory):
    """A run with a (random, narrow) network on 60 predict units: its input, model and outputs."""
    import torch

    from tests.predict_support import random_cpsam

    root = tmp_path_factory.mktemp("network")
    img = np.random.default_rng(7).gamma(2.0, 300.0, size=(20, 100, 90)).astype(np.uint16)
    write_ome_zarr(str(root / "img.ome.zarr"), img, axes="zyx", voxel_size=(1.0, 1.0, 1.0), chunks=(10, 50, 45))
    torch.save(random_cpsam(bsize=32), root / "net.pt")
    args = ["run", str(root / "img.ome.zarr"), None, "--model", str(root / "net.pt"), "--diameter", "24",
            "--chunk-shape", "10,50,45", "--predict-memory", "0.0002"]
    out = root / "ref"
    assert main([a if a is not None else str(out) for a in args]) == 0
    return args, out


def _store_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("stage, marker_dir", [("predict", "predict"), ("predict:combine", "combine")])
def test_killed_predict_resumes_to_the_same_flows(network_run, tmp_path, stage, marker_dir):
    args, ref = network_run
    out = tmp_path / "out"
    argv_ = [a if a is not None else str(out) for a in args]
    manifest = json.loads((ref / "run.json").read_text())
    total = manifest["predict"]["units"] if stage == "predict" else manifest["grid"]["nchunks"]
    kill_inside([sys.executable, "-m", "zseg", *argv_], tmp_path, stage,
                lambda: 2 <= len(_markers(out, marker_dir)) <= total - 2, delay=0.5)
    done = _markers(out, marker_dir)
    assert 2 <= len(done) < total
    again = subprocess.run([sys.executable, "-m", "zseg", *argv_], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["skipped"][stage] == chunk_ranges(done)
    assert _store_files(out / "work" / "flows.zarr") == _store_files(ref / "work" / "flows.zarr")
    np.testing.assert_array_equal(labels_of(out), labels_of(ref))
    assert same_table(out, ref)


# -- soak: many kills at random times ----------------------------------------------------------------
def _table_metadata_lost(out: Path) -> None:  # killed after mkdir, before zarr.json
    (out / "work" / "fingerprint" / "input.zarr" / "zarr.json").unlink()


def _table_chunk_lost(out: Path) -> None:  # killed after zarr.json, before the table's chunk
    shutil.rmtree(out / "work" / "fingerprint" / "input.zarr" / "c")


def _ends_metadata_lost(out: Path) -> None:  # killed inside create_ends
    (out / "work" / "ends.zarr" / "zarr.json").unlink()


def _only_a_partial_run_json(out: Path) -> None:  # killed while writing run.json the first time
    text = (out / "run.json").read_text()
    shutil.rmtree(out)
    out.mkdir()
    (out / "run.json.0123abcd.partial").write_text(text[:100])


@pytest.mark.parametrize("damage", [_table_metadata_lost, _table_chunk_lost, _ends_metadata_lost,
                                    _only_a_partial_run_json],
                         ids=["table-metadata", "table-chunk", "ends-metadata", "partial-run-json"])
def test_a_plan_killed_midway_resumes_to_identical_labels(data, reference, tmp_path, damage):
    """What a plan SIGKILLed midway leaves (the soak test once killed it inside the input's
    fingerprint table, and the resume said the table 'is not a zarr array'): the same command
    finishes the plan and the run, identical to the reference."""
    out = Path(_planned(data, tmp_path))
    damage(out)
    assert main(argv(data, out)) == 0
    np.testing.assert_array_equal(labels_of(out), reference[1])
    assert same_table(out, reference[0])
    assert verify_output(str(out))["ok"]


@pytest.mark.slow
def test_soak_twenty_kills_at_random_times_each_resume_to_identical_labels_and_table(data, reference, tmp_path):
    """20 cycles: `zseg run` SIGKILLed at a random moment (anywhere from start-up to the last
    stage), then the same command again; every cycle ends with the reference's labels and table."""
    rng = np.random.default_rng(20261206)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "zseg", *argv(data, out)]
    whole = float("inf")
    for _ in range(2):  # the faster of two uninterrupted runs, start-up included (the first warms caches)
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.monotonic()
        subprocess.run(cmd, capture_output=True, check=True)
        whole = min(whole, time.monotonic() - t0)
    killed = 0
    for cycle in range(20):
        shutil.rmtree(out)
        at = float(rng.uniform(0.1, whole))
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        try:
            proc.wait(timeout=at)
            whole = min(whole, time.monotonic() - t0)  # the machine got faster: kill earlier from now on
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed += 1
            again = subprocess.run(cmd, capture_output=True, text=True)
            finished_before = json.loads((out / "run.json").read_text())["complete"] if again.returncode else False
            # killed after its run was complete (while it let go of the folder): the run is finished
            assert again.returncode == 0 or (finished_before and "already holds a finished run" in again.stderr), \
                (cycle, at, again.stderr)
        assert proc.returncode in (0, -signal.SIGKILL), (cycle, at)
        np.testing.assert_array_equal(labels_of(out), reference[1], err_msg=f"cycle {cycle}, killed at {at:.2f} s")
        assert same_table(out, reference[0]), (cycle, at)
        assert verify_output(str(out))["ok"]
    assert killed >= 15  # the kills did land inside runs


# -- one dynamics device per run ---------------------------------------------------------------------
def test_the_first_follow_task_records_the_dynamics_device_and_the_report_keeps_it(reference):
    rec = json.loads((reference[0] / "work" / "dynamics.json").read_text())
    assert rec["device"] == "cpu" and rec["host"] and rec["pid"] > 0
    assert json.loads((reference[0] / "run.json").read_text())["result"]["dynamics_device"] == "cpu"


def _unfinished_copy(reference, tmp_path) -> Path:
    """The reference run as if killed in its report stage, its trajectories followed on a GPU."""
    out = fresh_copy(reference, tmp_path)
    manifest = json.loads((out / "run.json").read_text())
    manifest["complete"] = False
    (out / "run.json").write_text(json.dumps(manifest))
    (out / "work" / "report.json").unlink()
    rec = json.loads((out / "work" / "dynamics.json").read_text())
    (out / "work" / "dynamics.json").write_text(json.dumps({**rec, "device": "cuda", "host": "gpu-node-7"}))
    return out


def test_a_follow_task_on_another_device_than_the_runs_is_refused(reference, tmp_path, refused):
    out = _unfinished_copy(reference, tmp_path)
    (out / "work" / "follow" / "c0000003.json").unlink()
    refused(["seeds", "--run", str(out), "--stage", "follow", "--chunks", "3"],
            "followed on cuda", "this task would follow them on cpu", "--device cuda")
    assert not (out / "work" / "follow" / "c0000003.json").exists()


def test_resuming_on_another_dynamics_device_redoes_the_seeds_and_says_so(data, reference, tmp_path):
    out = _unfinished_copy(reference, tmp_path)
    stale = out / "work" / "partials" / "o0000017" / "c0000099.npz"  # a partial a new pass would not write
    shutil.copy(next((out / "work" / "partials").glob("o*/c*.npz")), stale)
    before = (out / "work" / "follow" / "c0000000.json").stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-m", "zseg", *argv(data, out)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "followed on cuda (on gpu-node-7), this machine follows them on cpu: redoing seeds:follow" in again.stderr
    report = json.loads(again.stdout)
    assert "seeds:follow" not in report["skipped"] and report["skipped"]["percentiles"] == f"0-{NCHUNKS - 1}"
    assert (out / "work" / "follow" / "c0000000.json").stat().st_mtime_ns != before
    assert json.loads((out / "work" / "dynamics.json").read_text())["device"] == "cpu"
    assert not stale.exists()
    np.testing.assert_array_equal(labels_of(out), reference[1])
    assert same_table(out, reference[0])
    assert verify_output(str(out))["ok"]


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_an_exclusive_create_lets_exactly_one_of_two_writers_win(where, tmp_path, request):
    from concurrent.futures import ThreadPoolExecutor

    from zseg.storage import uri as U

    root = request.getfixturevalue("s3_server") + f"/excl-{tmp_path.name}" if where == "s3" else str(tmp_path)
    target = f"{root}/lock.json"
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: U.create_exclusive(target, f"writer {i}".encode()), range(8)))
    assert sum(won) == 1
    assert U.read_bytes(target) == f"writer {won.index(True)}".encode()
    assert not U.create_exclusive(target, b"late")


# -- one run per folder ------------------------------------------------------------------------------
def test_a_finished_zseg_run_leaves_no_lock(reference):
    assert not (reference[0] / "zseg.lock").exists()


@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(data, reference, tmp_path,
                                                                                       refused):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "zseg", *argv(data, out)]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p),
           "ZSEG_TEST_SLOW": "seeds:follow=0.5"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_markers(out, "follow")) < 2:
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        refused(argv(data, out), "is in use by a zseg run", f"pid {first.pid} on host", "wait for it to finish")
        refused(argv(data, out, "--overwrite"), "is in use by a zseg run")  # --overwrite deletes nothing in use
        refused(["masks", "--run", str(out), "--chunks", "0"], "is in use by a zseg run")  # nor does a stage by hand
        assert (out / "run.json").exists() and first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert json.loads((out / "zseg.lock").read_text())["pid"] == first.pid  # a killed run cannot remove it
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"taking over the lock of a zseg run (pid {first.pid}" in again.stderr
    np.testing.assert_array_equal(labels_of(out), reference[1])
    assert not (out / "zseg.lock").exists()


def _foreign_lock(out: Path, minutes_old: float) -> None:
    import datetime as dt

    beat = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=minutes_old)).isoformat(timespec="seconds")
    out.mkdir(parents=True, exist_ok=True)
    (out / "zseg.lock").write_text(json.dumps({"holder": "zseg run", "session": None, "host": "node-17", "pid": 4242,
                                               "started": beat, "heartbeat": beat, "token": "x"}))


def test_a_lock_held_on_another_host_is_refused_and_a_stale_one_says_how_to_clear_it(data, tmp_path, refused):
    out = tmp_path / "out"
    _foreign_lock(out, 1)
    refused(argv(data, out), "is in use by a zseg run (pid 4242 on host node-17")
    _foreign_lock(out, 45)
    refused(argv(data, out), "last heartbeat is 45 minutes old", f"delete {out}/zseg.lock and start again")
    assert sorted(os.listdir(out)) == ["zseg.lock"]  # nothing planned
    (out / "zseg.lock").unlink()
    assert main(argv(data, out)) == 0


def test_a_folder_belongs_to_its_nextflow_session(data, reference, tmp_path, refused, capsys):
    """The plan task claims the folder for its session (again under -resume); tasks and runs of
    anyone else are refused; the last stage of a complete run frees it."""
    out = str(tmp_path / "out")
    plan_args = ["plan", data["image"], out, "--flows", data["flows"], "--diameter", str(DIAMETER),
                 "--chunk-shape", ",".join(map(str, CHUNK))]
    assert main([*plan_args, "--session", "session-a"]) == 0
    assert main([*plan_args, "--session", "session-a"]) == 0  # -resume: the same session plans again
    assert json.loads((Path(out) / "zseg.lock").read_text())["session"] == "session-a"
    refused([*plan_args, "--session", "session-b"], "belongs to Nextflow session session-a", "-resume session-a")
    refused(["percentiles", "--run", out, "--session", "session-b"], "this task is of Nextflow session session-b",
            "belongs to Nextflow session session-a")
    refused(argv(data, out), "belongs to Nextflow session session-a")
    capsys.readouterr()
    from zseg.workspace.stages import STAGES

    for st in STAGES.values():
        phase, _, sub = st.name.partition(":")
        stage = ["--reduce"] if sub == "reduce" else [] if not sub else ["--stage", sub]
        assert main([phase, "--run", out, *stage, "--session", "session-a"]) == 0, (st.name, capsys.readouterr().err)
        if st.name != "finalize:report":
            assert (Path(out) / "zseg.lock").exists()
    assert not (Path(out) / "zseg.lock").exists()  # complete: free again
    np.testing.assert_array_equal(labels_of(out), reference[1])


@pytest.mark.s3
def test_the_lock_on_s3_is_a_conditional_create(s3_server, tmp_path, refused):
    from zseg.workspace.lock import RunLock

    out = f"{s3_server}/locked-{tmp_path.name}"
    with RunLock(out) as held:
        with pytest.raises(UserError) as e:
            with RunLock(out):
                pass
        assert "is in use by a zseg run" in e.value.problems[0] and str(held.record["pid"]) in e.value.problems[0]
    from zseg.storage import uri as U

    assert not U.exists(f"{out}/zseg.lock")  # released at the end


# -- a changed input is noticed ----------------------------------------------------------------------
@pytest.fixture
def own_data(cells, tmp_path):
    """The test volume and flows in this test's own folder (the tests change them)."""
    return write_volume(str(tmp_path / "data"), *cells)


def _rewrite_chunk(array_dir: Path, index: int = 4) -> str:
    """Rewrite one stored chunk of a zarr array with other values of the same array: returns its key."""
    arr = zarr.open_array(str(array_dir), mode="r+")
    chunk = arr.chunks
    pos = np.unravel_index(index, [-(-n // c) for n, c in zip(arr.shape, chunk)])
    box = tuple(slice(p * c, min((p + 1) * c, n)) for p, c, n in zip(pos, chunk, arr.shape))
    arr[box] = np.asarray(arr[box])[..., ::-1]  # the same values, mirrored: another content
    return arr.metadata.encode_chunk_key(tuple(int(p) for p in pos))


def _planned_to_seeds(data, out: Path) -> None:
    """A run planned and taken up to the seeds: what a killed run leaves."""
    plan(build_params(input=data["image"], output=str(out), flows=data["flows"], diameter=DIAMETER,
                      chunk_shape=CHUNK))
    for phase, stage, reduce in (("percentiles", None, False), ("percentiles", None, True), ("seeds", "follow", False)):
        run_phase(str(out), phase, stage=stage, reduce=reduce)


def test_a_run_planned_by_a_zseg_with_other_stages_is_not_resumed_or_continued(data, tmp_path, refused):
    """run.json records the stages the run was planned with; a zseg whose stages differ (an
    upgrade in the middle of a long run: here, one from before finalize:holes) refuses to resume
    the run or to run any of its tasks, with one line, and writes nothing."""
    out = tmp_path / "out"
    _planned_to_seeds(data, out)
    manifest = json.loads((out / "run.json").read_text())
    run = RunContext.open(str(out))
    from zseg.workspace.stages import applicable

    assert manifest["stages"] == [s.name for s in applicable(run)] and "finalize:holes" in manifest["stages"]
    manifest["stages"].remove("finalize:holes")
    (out / "run.json").write_text(json.dumps(manifest))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    words = "holds a run planned by a zseg whose stages differ from this one's (new here: finalize:holes)"
    refused(argv(data, out), words, "finish it with the zseg that planned it, or pass --overwrite")
    refused(["seeds", "--run", str(out), "--stage", "find"], words)
    refused(["number", "--run", str(out)], words)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert main(argv(data, out, "--overwrite")) == 0


def test_plan_records_the_fingerprint_of_what_the_run_reads(own_data, tmp_path):
    out = tmp_path / "out"
    _planned_to_seeds(own_data, out)
    fp = json.loads((out / "run.json").read_text())["fingerprint"]
    assert set(fp) == {"input", "flows"}
    assert fp["input"]["kind"] == "zarr" and fp["input"]["objects"] == NCHUNKS and "zarr.json" in fp["input"]["metadata"]
    assert fp["flows"]["grid"] == [1, 2, 3, 3]
    table = np.asarray(open_array(str(out / "work" / "fingerprint" / "input.zarr"))[...])
    assert table.shape == (2, 2, 3, 3) and (table[0] > 0).all()


def test_resuming_after_an_input_chunk_changed_is_refused(own_data, tmp_path, refused):
    out = tmp_path / "out"
    _planned_to_seeds(own_data, out)
    key = _rewrite_chunk(Path(own_data["image"]) / "0")
    err = refused(argv(own_data, out), f"input {str(Path(own_data['image']) / '0')!r}: 1 stored object(s) changed: "
                  f"{key} (rewritten) since this run was planned", "pass --overwrite")
    assert "a run must read one input throughout" in err[0]
    verify_fails(out, f"{key} (rewritten)")
    assert main(argv(own_data, out, "--overwrite")) == 0  # starting again reads the new input


def test_a_task_reading_a_changed_chunk_is_refused_and_others_are_not(own_data, tmp_path, refused):
    out = tmp_path / "out"
    _planned_to_seeds(own_data, out)
    shutil.rmtree(out / "work" / "percentiles")  # the percentiles tasks read the input again
    key = _rewrite_chunk(Path(own_data["image"]) / "0", index=4)
    assert main(["percentiles", "--run", str(out), "--chunks", "0"]) == 0  # chunk 0 reads unchanged objects
    refused(["percentiles", "--run", str(out), "--chunks", "4"], f"stored object {key} changed since this run was planned")


def test_changed_flows_and_changed_metadata_are_refused(own_data, tmp_path, refused):
    out = tmp_path / "out"
    _planned_to_seeds(own_data, out)
    key = _rewrite_chunk(Path(own_data["flows"]), index=0)
    shutil.rmtree(out / "work" / "follow")
    refused(["seeds", "--run", str(out), "--stage", "follow", "--chunks", "0"],
            f"flows {own_data['flows']!r}: stored object {key} changed")
    meta = Path(own_data["image"]) / "0" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc.setdefault("attributes", {})["edited"] = True
    meta.write_text(json.dumps(doc))
    refused(argv(own_data, out), "its metadata (zarr.json) changed")


def test_a_replaced_tiff_input_is_refused(cells, tmp_path, refused):
    image, flows = cells
    d = write_volume(str(tmp_path / "d"), image, flows)
    tif = tmp_path / "image.tif"
    tifffile.imwrite(tif, image)
    out = tmp_path / "out"
    plan(build_params(input=str(tif), output=str(out), flows=d["flows"], diameter=DIAMETER, chunk_shape=CHUNK))
    tifffile.imwrite(tif, image[:, ::-1])
    refused(["run", str(tif), str(out), "--flows", d["flows"], "--diameter", str(DIAMETER),
             "--chunk-shape", ",".join(map(str, CHUNK))], f"input {str(tif)!r} was replaced")


# -- a full or read-only disk ------------------------------------------------------------------------
@pytest.mark.parametrize("errno_, store, words", [
    (28, "masks.zarr", "the disk is full"),  # ENOSPC in a zarr chunk of the masks stage
    (30, "work/seeds/c0000005.npz", "the file system is read-only"),  # EROFS writing a chunk file
])
def test_a_full_or_read_only_disk_stops_the_task_with_one_line_and_the_run_resumes(data, reference, tmp_path,
                                                                                    monkeypatch, refused, errno_,
                                                                                    store, words):
    import zarr.storage._local as local

    from zseg.storage import uri as U

    out = tmp_path / "out"
    put, atomic = local._put, U.atomic_local_file

    def full_put(path, value, exclusive=False):
        if store in str(path) and "zarr.json" not in str(path):
            raise OSError(errno_, os.strerror(errno_), str(path))
        return put(path, value, exclusive=exclusive)

    def full_file(path, **kw):
        if str(path).endswith(store):
            raise OSError(errno_, os.strerror(errno_), str(path))
        return atomic(path, **kw)

    monkeypatch.setattr(local, "_put", full_put)
    monkeypatch.setattr(U, "atomic_local_file", full_file)
    err = refused(argv(data, out), words, "run the same command again")
    stage = "masks" if store == "masks.zarr" else "seeds:find, chunk 5"
    assert err[0].startswith(f"zseg: error: {stage}") and "cannot write " in err[0]
    assert store.split("/")[-1] in err[0]
    monkeypatch.undo()  # room again
    assert main(argv(data, out)) == 0
    np.testing.assert_array_equal(labels_of(out), reference[1])
    assert same_table(out, reference[0])


# -- flaky storage -----------------------------------------------------------------------------------
@pytest.mark.s3
@pytest.mark.slow
def test_throttling_and_resets_on_s3_are_retried_and_the_labels_are_the_same(s3_server, cells, data, reference,
                                                                             tmp_path, monkeypatch):
    """A throttling episode of 6 requests in a row answered 503 SlowDown (longer than botocore's
    default 5 attempts ride out), and every 37th request dropped without an answer: the run on S3
    through them ends with the labels of the local run, and verifies."""
    import s3fs

    remote = write_volume(f"{s3_server}/flaky", *cells)
    proxy = FlakyProxy(os.environ["AWS_ENDPOINT_URL"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        out = f"{s3_server}/flaky/out"
        assert main(argv(remote, out)) == 0
        np.testing.assert_array_equal(labels_of(out), reference[1])
        assert verify_output(out)["ok"]
    finally:
        proxy.close()
        s3fs.S3FileSystem.clear_instance_cache()
    assert proxy.failed == 6 and proxy.dropped > 10, (proxy.count, proxy.failed, proxy.dropped)


def test_the_same_command_after_the_input_changed_says_the_finished_run_is_of_the_old_input(own_data, tmp_path,
                                                                                           refused):
    out = tmp_path / "out"
    assert main(argv(own_data, out)) == 0
    key = _rewrite_chunk(Path(own_data["image"]) / "0")
    refused(argv(own_data, out), "holds a finished run of the input as it was", f"{key} (rewritten)",
            "pass --overwrite to segment it as it is now")
    verify_fails(out, f"{key} (rewritten) since the run was planned")


def test_a_plan_killed_before_its_fingerprint_tables_is_resumed_with_them(own_data, tmp_path):
    out = tmp_path / "out"
    _planned_to_seeds(own_data, out)
    shutil.rmtree(out / "work" / "fingerprint")  # as if killed right after run.json
    assert main(argv(own_data, out)) == 0
    assert (out / "work" / "fingerprint" / "input.zarr").exists()
    assert verify_output(str(out))["ok"]
