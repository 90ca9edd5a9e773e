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
