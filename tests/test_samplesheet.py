"""Samplesheets (``--input SHEET.csv``): validated against assets/schema_input.json, every row
run into OUTDIR/<sample>/ with the labels a run of that image alone gives."""

from __future__ import annotations

import json
import os

import jsonschema
import numpy as np
import pytest

from tests.volumes import write_volume
from zseg.cli import main
from zseg.engine.synth import flows_from_labels, synth_cells
from zseg.samplesheet import SCHEMA, read_samplesheet
from zseg.storage.arrays import open_array

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (16, 40, 40)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two small volumes with their exact flows: {name: {"image": ..., "flows": ...}}."""
    out = {}
    for seed, name in ((1, "a"), (2, "b")):
        root = tmp_path_factory.mktemp(name)
        image, labels = synth_cells(SHAPE, diameter=10.0, seed=seed)
        out[name] = write_volume(str(root), image, flows_from_labels(labels), chunks=(8, 20, 20))
    return out


def _sheet(tmp_path, text: str, name="samples.csv") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _labels(folder) -> np.ndarray:
    return np.asarray(open_array(os.path.join(folder, "labels.zarr", "0"))[...])


def test_the_asset_is_the_schema_zseg_validates_with():
    with open(os.path.join(ROOT, "assets", "schema_input.json")) as f:
        assert json.load(f) == SCHEMA
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_zseg_run_of_a_samplesheet_equals_a_run_of_each_image(images, tmp_path, capsys):
    sheet = _sheet(tmp_path, "sample,image,flows\n"
                   f"first,{images['a']['image']},{images['a']['flows']}\n"
                   f"second,{images['b']['image']},{images['b']['flows']}\n")
    out = tmp_path / "out"
    assert main(["run", sheet, str(out), "--diameter", "10", "--chunk-shape", "8,20,20"]) == 0
    assert sorted(os.listdir(out)) == ["first", "second"]
    for sample, name in (("first", "a"), ("second", "b")):
        alone = tmp_path / f"alone-{name}"
        assert main(["run", images[name]["image"], str(alone), "--flows", images[name]["flows"],
                     "--diameter", "10", "--chunk-shape", "16,40,40"]) == 0
        got, want = _labels(out / sample), _labels(alone)
        assert want.max() > 3
        np.testing.assert_array_equal(got, want)
    # a second run skips the finished samples and says so; not a byte changes
    before = {p: os.path.getmtime(p) for p in map(str, out.rglob("*"))}
    capsys.readouterr()
    assert main(["run", sheet, str(out), "--diameter", "10", "--chunk-shape", "8,20,20"]) == 0
    err = capsys.readouterr().err
    assert "sample first: finished already" in err and "sample second: finished already" in err
    assert {p: os.path.getmtime(p) for p in map(str, out.rglob("*"))} == before


def test_samplesheet_command_names_each_output_folder(images, tmp_path, capsys):
    os.chdir(tmp_path)
    os.symlink(images["a"]["image"], tmp_path / "a.ome.zarr")
    sheet = _sheet(tmp_path, "sample,image\nx,a.ome.zarr\n")
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"input": "samples.csv", "outdir": "res", "work": "/scratch/w",
                                  "launch_dir": str(tmp_path), "shard_size": 4}))
    capsys.readouterr()
    assert main(["samplesheet", "--nextflow-params", str(params), "--emit", str(tmp_path / "s.json")]) == 0
    samples = json.loads((tmp_path / "s.json").read_text())["samples"]
    assert samples == [{"sample": "x", "image": str(tmp_path / "a.ome.zarr"), "outdir": str(tmp_path / "res" / "x"),
                        "work": "/scratch/w/x"}]
    assert read_samplesheet(sheet, str(tmp_path))[0]["image"] == str(tmp_path / "a.ome.zarr")


@pytest.mark.parametrize("text, expect, lines", [
    ("", ["empty", "sample,image"], 1),
    ("sample,image\n", ["no rows"], 1),
    ("sample,imgae\nx,{a}\n", ["unknown column(s) 'imgae'", "sample, image, flows"], 1),
    ("sample\nx\n", ["no column 'image'"], 1),
    ("sample,image\nx,{a}\nx,{b}\n", ["line 3", "sample 'x' is also on line 2"], 1),
    ("sample,image\nmy sample,{a}\n", ["line 2", "sample 'my sample'", "name of its output folder"], 1),
    ("sample,image\n../up,{a}\n", ["sample '../up'"], 1),
    ("sample,image\nx,\n", ["line 2 (sample x)", "image is empty; it is required"], 1),
    ("sample,image\nx,/no/such/vol.zarr\n", ["image '/no/such/vol.zarr' does not exist"], 1),
    ("sample,image,flows\nx,{a},/no/flows.zarr\n", ["flows '/no/flows.zarr' does not exist"], 1),
    ("sample,image\nx,{a},extra\n", ["line 2", "3 cells for the 2 columns"], 1),
    ("sample,image\n,{a}\nx,/none\n", ["line 2", "sample is empty", "line 3", "does not exist"], 2),
])
def test_bad_samplesheets_are_refused(images, tmp_path, refused, text, expect, lines):
    sheet = _sheet(tmp_path, text.format(a=images["a"]["image"], b=images["b"]["image"]))
    refused(["run", sheet, str(tmp_path / "out")], *expect, lines=lines)
    refused(["samplesheet", sheet, str(tmp_path / "out")], *expect, lines=lines)
    assert not (tmp_path / "out").exists(), "nothing written for a refused sheet"


def test_a_missing_samplesheet_and_flows_beside_one_are_refused(images, tmp_path, refused):
    refused(["run", str(tmp_path / "none.csv"), str(tmp_path / "out")], "no such samplesheet")
    sheet = _sheet(tmp_path, f"sample,image\nx,{images['a']['image']}\n")
    refused(["run", sheet, str(tmp_path / "out"), "--flows", images["a"]["flows"]], "flows column")
    refused(["plan", sheet, str(tmp_path / "out")], "is a samplesheet", "zseg run SHEET OUTDIR")
