"""`zseg crops` (Cellpose's make_train.py): how many crops, their shapes, Z stretched by the
anisotropy in ZY and ZX crops exactly as cv2 stretches the whole plane, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from tests.volumes import write_volume
from zseg.cli import main

cv2 = pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    root = tmp_path_factory.mktemp("crops")
    img = np.random.default_rng(0).integers(0, 4000, size=(10, 40, 50)).astype(np.uint16)
    return img, write_volume(str(root), img, chunks=(5, 20, 25), voxel_size=(2.0, 1.0, 1.0))["image"]


def test_crops_of_each_view_with_z_stretched_by_the_anisotropy(volume, tmp_path, capsys):
    img, uri = volume
    out = tmp_path / "train"
    assert main(["crops", uri, str(out), "--crop-size", "32", "--nimg-per-tif", "4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["views"] == {"YX": 4, "ZY": 4, "ZX": 4}
    index = json.loads((out / "crops.json").read_text())
    assert index["anisotropy"] == 2.0  # from the voxel size
    planes = {"YX": lambda p: img[p], "ZY": lambda p: img[:, :, p], "ZX": lambda p: img[:, p, :]}
    for c in index["crops"]:
        crop = tifffile.imread(out / c["file"])
        assert c["file"].startswith(("image_YX_", "image_ZY_", "image_ZX_")) and crop.dtype == np.float32
        plane = planes[c["view"]](c["plane"]).astype(np.float32)
        if c["view"] != "YX":  # Z stretched to int(2 * 10) = 20 rows, as cv2 stretches the whole plane
            plane = cv2.resize(plane, (plane.shape[1], 20), interpolation=cv2.INTER_LINEAR)
        expect = plane[slice(*c["rows"]), slice(*c["cols"])]
        assert crop.shape == expect.shape == ((32, 32) if c["view"] == "YX" else (20, 32))
        np.testing.assert_allclose(crop, expect, rtol=0, atol=1e-3)
    assert len({(c["view"], c["plane"]) for c in index["crops"]}) == 12  # no plane twice


def test_the_number_of_crops_is_capped_by_the_planes_and_channels_go_last(tmp_path, capsys):
    img = np.random.default_rng(1).integers(0, 100, size=(2, 3, 20, 24)).astype(np.uint16)  # c, z, y, x
    uri = write_volume(str(tmp_path / "in"), img, axes="czyx", chunks=(3, 20, 24))["image"]
    assert main(["crops", uri, str(tmp_path / "o"), "--crop-size", "16", "--nimg-per-tif", "50",
                 "--channels", "1,0", "--anisotropy", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["views"] == {"YX": 3, "ZY": 24, "ZX": 20}
    index = json.loads((tmp_path / "o" / "crops.json").read_text())
    c = next(c for c in index["crops"] if c["view"] == "ZX")
    crop = tifffile.imread(tmp_path / "o" / c["file"])
    assert crop.shape == (3, 16, 2)  # Z (3 rows, unstretched) x 16 columns x 2 channels
    np.testing.assert_array_equal(crop, np.moveaxis(img[[1, 0], :, c["plane"], slice(*c["cols"])], 0, -1))


@pytest.mark.parametrize("args, words", [
    (["--crop-size", "8"], "--crop-size 8: give at least 16"),
    (["--nimg-per-tif", "0"], "--nimg-per-tif 0"),
    (["--anisotropy", "-1"], "--anisotropy -1.0: give a positive number"),
])
def test_bad_crop_options_are_refused(volume, tmp_path, refused, args, words):
    refused(["crops", volume[1], str(tmp_path / "o"), *args], words)
    assert not (tmp_path / "o").exists()


def test_a_folder_with_files_is_not_overwritten(volume, tmp_path, refused):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.tif").write_bytes(b"mine")
    refused(["crops", volume[1], str(out)], "is not empty")
    assert (out / "keep.tif").read_bytes() == b"mine"


def test_only_the_crop_windows_are_read(volume, tmp_path, monkeypatch):
    from zseg.storage.volume import Volume

    boxes = []
    read = Volume.read
    monkeypatch.setattr(Volume, "read", lambda self, box: boxes.append(box) or read(self, box))
    assert main(["crops", volume[1], str(tmp_path / "o"), "--crop-size", "16", "--nimg-per-tif", "2"]) == 0
    assert len(boxes) == 6
    for box in boxes:  # one plane, a window of 16 (Z: the 9-10 input rows 16 stretched rows read)
        sizes = sorted(s.stop - s.start for s in box)
        assert sizes[0] == 1 and sizes[1] <= 16 and sizes[2] <= 16, box
