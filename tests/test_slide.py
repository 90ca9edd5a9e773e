"""zseg.storage.slide: 2D multiplex slides from OME-TIFF, OME-Zarr and plain arrays."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from zseg.errors import UserError
from zseg.storage.omezarr import write_ome_zarr
from zseg.storage.slide import open_slide

NAMES = ["DAPI", "CD3", "DAPI", "Blank", "Blank", "PanCK"]
CYX = np.random.default_rng(0).integers(0, 60000, (6, 100, 140), dtype=np.uint16)


def _mean2(a):
    h, w = a.shape[-2] // 2 * 2, a.shape[-1] // 2 * 2
    b = a[..., :h, :w].astype(np.float64)
    return np.round((b[..., 0::2, 0::2] + b[..., 1::2, 0::2] + b[..., 0::2, 1::2] + b[..., 1::2, 1::2]) / 4
                    ).astype(a.dtype)


@pytest.fixture
def ome_tiff(tmp_path):
    """A tiled, pyramidal OME-TIFF (two levels, 32x32 tiles) with repeated channel names."""
    path = str(tmp_path / "slide.ome.tif")
    with tifffile.TiffWriter(path) as tw:
        tw.write(CYX, subifds=1, tile=(32, 32), metadata={
            "axes": "CYX", "PhysicalSizeY": 0.5, "PhysicalSizeX": 0.5, "Channel": {"Name": NAMES}})
        tw.write(_mean2(CYX), subfiletype=1, tile=(32, 32))
    return path


def test_an_ome_tiff_slide_with_repeated_names(ome_tiff):
    s = open_slide(ome_tiff)
    assert s.format == "tiff" and s.shape == (100, 140) and s.dtype == np.uint16
    assert s.channel_names == ["DAPI", "CD3", "DAPI_2", "Blank", "Blank_2", "PanCK"]
    assert s.original_names == NAMES
    assert s.pixel_size == pytest.approx((0.5, 0.5)) and s.unit == "micrometer"
    assert s.chunks == (32, 32)
    box = (slice(10, 70), slice(33, 101))
    np.testing.assert_array_equal(s.read(box), CYX[:, 10:70, 33:101])
    picked = [s.channel("PanCK"), s.channel("DAPI_2"), s.channel(1), s.channel("0")]
    assert picked == [5, 2, 1, 0]
    np.testing.assert_array_equal(s.read(box, picked), CYX[picked][:, 10:70, 33:101])
    d = s.describe()
    assert d["channel_names"][2] == "DAPI_2" and d["stored_channel_names"][2] == "DAPI"
    half = open_slide(ome_tiff, level=1)
    assert half.shape == (50, 70) and half.pixel_size == pytest.approx((1.0, 1.0))
    np.testing.assert_array_equal(half.read((slice(None), slice(None)), [3]), _mean2(CYX)[[3]])


def test_an_unknown_channel_is_refused_with_the_list_of_names(ome_tiff):
    s = open_slide(ome_tiff)
    with pytest.raises(UserError, match=r"channel 'CD8' is not in slide .*6 channels: 0 \(DAPI\), 1 \(CD3\), "
                                        r"2 \(DAPI_2\), .*5 \(PanCK\); give a name or an index 0-5"):
        s.channel("CD8")
    with pytest.raises(UserError, match="channel 6 is not in slide"):
        s.channel(6)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_an_ome_zarr_cyx_slide(tmp_path, zarr_format):
    uri = str(tmp_path / "slide.ome.zarr")
    write_ome_zarr(uri, CYX, axes="cyx", voxel_size=(0.65, 0.65), chunks=(1, 64, 64), zarr_format=zarr_format,
                   levels=2, channel_names=NAMES)
    s = open_slide(uri)
    assert s.format.startswith("ome-zarr") and s.shape == (100, 140)
    assert s.channel_names[2] == "DAPI_2" and s.pixel_size == pytest.approx((0.65, 0.65))
    np.testing.assert_array_equal(s.read((slice(0, 100), slice(5, 9)), [4, 0]), CYX[[4, 0], :, 5:9])
    assert open_slide(uri, level=1).shape == (50, 70)


@pytest.mark.parametrize("axes", ["cyx", "yxc"])
def test_plain_zarr_and_tiff_with_axes(tmp_path, axes):
    data = CYX if axes == "cyx" else np.ascontiguousarray(CYX.transpose(1, 2, 0))
    z = zarr.create_array(str(tmp_path / "plain.zarr"), shape=data.shape, chunks=data.shape, dtype=data.dtype)
    z[...] = data
    tif = str(tmp_path / "plain.tif")
    tifffile.imwrite(tif, data, photometric="minisblack", metadata=None)
    for uri in (str(tmp_path / "plain.zarr"), tif):
        s = open_slide(uri, axes=axes)
        assert s.shape == (100, 140) and s.channel_names == [str(i) for i in range(6)]
        np.testing.assert_array_equal(s.read((slice(3, 50), slice(0, 140)), [1, 5]), CYX[[1, 5], 3:50])
    # a 3D plain zarr array is read as cyx by default
    assert open_slide(str(tmp_path / "plain.zarr")).shape == ((100, 140) if axes == "cyx" else (140, 6))


def test_a_single_channel_2d_image(tmp_path):
    path = str(tmp_path / "one.tif")
    tifffile.imwrite(path, CYX[0])
    s = open_slide(path)
    assert s.shape == (100, 140) and s.nchannels == 1 and s.channel_names == ["0"]
    np.testing.assert_array_equal(s.read((slice(None), slice(None)))[0], CYX[0])


def test_a_volume_and_bad_axes_are_refused(tmp_path):
    path = str(tmp_path / "vol.tif")
    tifffile.imwrite(path, np.zeros((5, 3, 16, 16), np.uint16), photometric="minisblack",
                    metadata={"axes": "ZCYX"})
    with pytest.raises(UserError, match=r"has 5 planes in z .*a multiplex slide is 2D \(C, Y, X\)"):
        open_slide(path)
    flat = str(tmp_path / "flat.tif")
    tifffile.imwrite(flat, np.zeros((1, 3, 16, 16), np.uint16), photometric="minisblack",
                    metadata={"axes": "ZCYX"})
    assert open_slide(flat).shape == (16, 16)  # one z plane is a slide
    with pytest.raises(UserError, match="a slide's axes are c, y and x"):
        open_slide(flat, axes="zyx")
    pages = str(tmp_path / "pages.tif")
    tifffile.imwrite(pages, CYX, photometric="minisblack", metadata=None)  # no axes: pages read as z
    with pytest.raises(UserError, match=r"6 planes in z .*if that axis holds channels, say so with --axes"):
        open_slide(pages)
    assert open_slide(pages, axes="cyx").nchannels == 6
    with pytest.raises(UserError, match="does not exist"):
        open_slide(str(tmp_path / "missing.ome.tif"))


def test_zseg_synth_multiplex_writes_a_slide_its_truth_and_both_flows(tmp_path):
    import pandas as pd
    from cellpose import dynamics as cellpose_dynamics
    from cellpose import metrics

    from zseg.cli import main
    from zseg.engine import dynamics as D
    from zseg.engine import matching as M
    from zseg.engine import multiplex as X
    from zseg.engine.stats import block_stats

    out = tmp_path / "synth"
    assert main(["synth", str(out), "--multiplex", "--shape", "160,192", "--diameter", "20", "--markers", "2"]) == 0
    s = open_slide(str(out / "slide.ome.zarr"))
    assert s.channel_names == ["DAPI", "Membrane", "M1", "M2"] and s.shape == (160, 192)
    assert s.pixel_size == pytest.approx((0.5, 0.5))
    image = s.read((slice(None), slice(None)))
    root = zarr.open_group(str(out / "slide.ome.zarr"), mode="r")
    cells, nuclei = root["labels/cells/0"][...], root["labels/nuclei/0"][...]
    # the truth table holds the markers' means, as the engine's table measures them
    truth = pd.read_parquet(out / "truth.parquet")
    layers = M.apply_matching(cells, nuclei, (cells != 0) & ~M.inner_boundary(cells), *M.match_masks(cells, nuclei),
                              np.arange(1, cells.max() + 1))
    parts = {c: block_stats(layer, image) for c, layer in zip(X.COMPARTMENTS, layers)}
    table = X.compartment_table(parts, s.channel_names, s.pixel_size)
    for col in ("M1_nucleus_mean", "M2_cytoplasm_mean"):
        np.testing.assert_array_equal(table[col], truth[col].to_numpy())
    # each compartment's oracle flows give its truth back (2D Cellpose semantics, flow QC on)
    for name, lab in (("flows.zarr", cells), ("nuclear_flows.zarr", nuclei)):
        f = zarr.open_array(str(out / name), mode="r")[...]
        assert f.shape == (3, 160, 192) and f.dtype == np.float16
        got = D.compute_masks(f[:2], f[2], niter=200, min_size=15, flow_threshold=0.4)
        assert metrics.average_precision([lab.astype(np.int64)], [got.astype(np.int64)])[0][0][0] >= 0.99
        theirs = cellpose_dynamics.compute_masks(f[:2].astype(np.float32), f[2].astype(np.float32), niter=200,
                                                 min_size=15, flow_threshold=0.4)
        # Cellpose's own 2D masks from the same flows: the same pixels in each mask (its numbering differs)
        pairs = np.unique(np.stack([got.ravel(), theirs.ravel()]), axis=1)
        assert pairs.shape[1] == len(np.unique(got)) == len(np.unique(theirs))
    # refusals: nothing written
    assert main(["synth", str(tmp_path / "bad"), "--multiplex", "--shape", "64,64,64"]) == 2
    assert main(["synth", str(tmp_path / "bad"), "--multiplex", "--membrane"]) == 2
    assert not (tmp_path / "bad").exists()
    assert main(["synth", str(out), "--multiplex", "--shape", "160,192"]) == 2  # exists, no --overwrite


def test_segmentation_channels_by_name_and_index_and_their_refusals(ome_tiff):
    s = open_slide(ome_tiff)
    assert s.segmentation_channels("both", "DAPI", ["CD3", "PanCK"]) == (0, (1, 5))
    assert s.segmentation_channels("whole-cell", None, ["5"]) == (None, (5,))
    assert s.segmentation_channels("nuclear", "DAPI_2") == (2, ())
    refusals = [
        (("both", "DAPI", ["DAPI", "CD3"]), r"'DAPI' is both --nuclear-channel and one of --membrane-channels"),
        (("both", 0, ["CD3", 1]), r"--membrane-channels names CD3 more than once"),
        (("both", None, ["CD3"]), r"--compartment both needs --nuclear-channel \(one of 0 \(DAPI\)"),
        (("whole-cell", "DAPI", []), r"--compartment whole-cell needs --membrane-channels"),
        (("nuclear", "DAPI", ["CD3"]), r"a nuclear-only run reads no membrane"),
        (("cells", "DAPI", ["CD3"]), r"--compartment 'cells': use whole-cell, nuclear or both"),
        (("both", "DAPI", ["CD8"]), r"channel 'CD8' is not in slide"),
    ]
    for args, message in refusals:
        with pytest.raises(UserError, match=message):
            s.segmentation_channels(*args)
