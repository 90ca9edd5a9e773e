"""The stores layer: opening inputs of every format, locally and on S3; creating arrays;
writing OME-Zarr."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import tifffile
import zarr

from tests.volumes import NAMES, SOURCE, VOXEL, put_file, write_format
from zseg.errors import UserError
from zseg.storage import volume as volume_module
from zseg.storage.arrays import create_array, open_array, read_region, write_region
from zseg.storage.omezarr import write_ome_zarr
from zseg.storage.volume import FORMATS, open_volume

BOX = (slice(3, 9), slice(2, 14), slice(5, 17))
EVERYWHERE = ["local", "s3"]


def _mean2(a: np.ndarray) -> np.ndarray:
    """Reference 2x2 mean over the last two axes, rounded, same dtype."""
    *lead, ny, nx = a.shape
    m = a.reshape(*lead, ny // 2, 2, nx // 2, 2).mean(axis=(-3, -1))
    return np.round(m).astype(a.dtype)


@pytest.fixture(scope="module")
def inputs(request, tmp_path_factory):
    """Every format written once per location: {("local"|"s3", fmt): uri}."""
    made = {}
    for where in EVERYWHERE:
        tmp = tmp_path_factory.mktemp(f"inputs-{where}")
        base = request.getfixturevalue("s3_server") + "/inputs" if where == "s3" else str(tmp)
        for fmt in FORMATS:
            made[where, fmt] = write_format(fmt, base, tmp)
    return made


# -- every format, local and on S3 ---------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("where", EVERYWHERE)
def test_volume_matches_its_source(inputs, where, fmt):
    vol = open_volume(inputs[where, fmt], channels=[1, 0])
    assert vol.format == fmt
    assert vol.shape == SOURCE.shape[1:]
    assert vol.dtype == SOURCE.dtype
    assert vol.nchannels == 2
    if fmt.startswith("zarr"):
        assert vol.voxel_size is None and vol.unit is None
    else:
        assert vol.voxel_size == pytest.approx(VOXEL)
        assert vol.unit == "micrometer"
    expected = SOURCE[[1, 0]][(slice(None), *BOX)]
    got = vol.read(BOX)
    assert got.dtype == SOURCE.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(vol.read((slice(None),) * 3), SOURCE[[1, 0]])
    json.dumps(vol.describe())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("where", EVERYWHERE)
def test_volume_reopens_after_pickling(inputs, where, fmt):
    vol = open_volume(inputs[where, fmt], channels=[0])
    vol.read(BOX)  # opened handles must not travel
    clone = pickle.loads(pickle.dumps(vol))
    np.testing.assert_array_equal(clone.read(BOX), SOURCE[[0]][(slice(None), *BOX)])
    assert clone.describe() == vol.describe()


@pytest.mark.parametrize("fmt", ["ome-zarr-0.4", "ome-zarr-0.5"])
@pytest.mark.parametrize("where", EVERYWHERE)
def test_channels_by_name_keep_the_given_order(inputs, where, fmt):
    vol = open_volume(inputs[where, fmt], channels=["GFP", "DAPI"])
    assert vol.channel_names == ["GFP", "DAPI"]
    np.testing.assert_array_equal(vol.read(BOX), SOURCE[[1, 0]][(slice(None), *BOX)])
    single = open_volume(inputs[where, fmt], channels=["GFP"])
    assert single.nchannels == 1 and single.channel_names == ["GFP"]
    np.testing.assert_array_equal(single.read(BOX), SOURCE[[1]][(slice(None), *BOX)])


@pytest.mark.parametrize("fmt", ["ome-zarr-0.4", "ome-zarr-0.5"])
@pytest.mark.parametrize("where", EVERYWHERE)
def test_level_one_is_the_halved_image_with_doubled_voxels(inputs, where, fmt):
    vol = open_volume(inputs[where, fmt], level=1, channels=[1])
    assert vol.shape == (12, 8, 10)
    assert vol.voxel_size == pytest.approx((VOXEL[0], 2 * VOXEL[1], 2 * VOXEL[2]))
    np.testing.assert_array_equal(vol.read((slice(None),) * 3), _mean2(SOURCE[[1]]))


def test_voxel_size_composes_the_global_scale_and_converts_mixed_units(tmp_path):
    uri = str(tmp_path / "img.ome.zarr")
    write_ome_zarr(uri, SOURCE, voxel_size=(2000.0, 0.5, 0.25), zarr_format=2, levels=2)
    group = zarr.open_group(uri, mode="r+")
    ms = group.attrs["multiscales"]
    ms[0]["axes"][1]["unit"] = "nanometer"  # z in nm, y and x in micrometres
    ms[0]["coordinateTransformations"] = [{"type": "scale", "scale": [1, 3, 1, 2]}]
    group.attrs["multiscales"] = ms
    vol = open_volume(uri, level=1, channels=[0])
    assert vol.unit == "micrometer"
    assert vol.voxel_size == pytest.approx((2.0 * 3, 0.5 * 2, 0.25 * 2 * 2))


@pytest.mark.parametrize("where", EVERYWHERE)
def test_pyramidal_ome_tiff_levels(where, tmp_path, request):
    local = str(tmp_path / "pyramid.ome.tif")
    zcyx = np.ascontiguousarray(SOURCE.transpose(1, 0, 2, 3))
    with tifffile.TiffWriter(local) as tw:
        tw.write(zcyx, subifds=1, metadata={
            "axes": "ZCYX", "PhysicalSizeZ": VOXEL[0], "PhysicalSizeY": VOXEL[1],
            "PhysicalSizeX": VOXEL[2], "Channel": {"Name": NAMES}})
        tw.write(_mean2(zcyx), subfiletype=1)
    uri = put_file(local, request.getfixturevalue("s3_server") + "/pyr.ome.tif") \
        if where == "s3" else local
    full = open_volume(uri, channels=["GFP"])
    assert full.voxel_size == pytest.approx(VOXEL) and full.channel_names == ["GFP"]
    half = open_volume(uri, level=1, channels=[1])
    assert half.shape == (12, 8, 10)
    assert half.voxel_size == pytest.approx((VOXEL[0], 2 * VOXEL[1], 2 * VOXEL[2]))
    np.testing.assert_array_equal(half.read((slice(None),) * 3), _mean2(SOURCE[[1]]))
    with pytest.raises(UserError, match="2 resolution levels"):
        open_volume(uri, level=2, channels=[0])


def test_s3_tiff_reads_only_the_pages_of_the_box(s3_server, tmp_path, monkeypatch):
    monkeypatch.setattr(volume_module, "_TIFF_BLOCK_SIZE", 1024)
    stack = np.random.default_rng(1).integers(0, 60000, (32, 64, 64), dtype=np.uint16)
    local = str(tmp_path / "big.tif")
    tifffile.imwrite(local, stack)  # 32 pages of 8 KiB
    uri = put_file(local, f"{s3_server}/lazy/big.tif")
    vol = open_volume(uri)
    assert vol.format == "tiff" and vol.shape == stack.shape and vol.chunks[0] == 1
    box = (slice(10, 12), slice(0, 64), slice(3, 40))
    np.testing.assert_array_equal(vol.read(box)[0], stack[box])
    fetched = vol._open["handle"].cache.total_requested_bytes
    assert fetched < stack.nbytes / 4, f"fetched {fetched} bytes of {stack.nbytes}"


# -- axes, time, layouts ---------------------------------------------------------------------
def test_plain_array_with_given_axes_is_read_in_czyx_order(tmp_path):
    uri = str(tmp_path / "zcyx.zarr")
    create_array(uri, shape=(12, 2, 16, 20), chunks=(4, 1, 8, 8), dtype="uint16")[...] = \
        SOURCE.transpose(1, 0, 2, 3)
    vol = open_volume(uri, axes="ZCYX", channels=[1, 0])
    np.testing.assert_array_equal(vol.read(BOX), SOURCE[[1, 0]][(slice(None), *BOX)])
    assert vol.chunks == (4, 8, 8)


def test_cellposes_channel_and_z_axis_name_the_axes_of_a_plain_array_and_a_tiff(tmp_path):
    """--channel-axis/--z-axis (Cellpose's 0-based positions) on a zcyx array and an unnamed TIFF
    read the same voxels as --axes zcyx."""
    import tifffile

    uri = str(tmp_path / "zcyx.zarr")
    create_array(uri, shape=(12, 2, 16, 20), chunks=(4, 1, 8, 8), dtype="uint16")[...] = \
        SOURCE.transpose(1, 0, 2, 3)
    tif = str(tmp_path / "yxzc.tif")  # a stack whose axes tifffile cannot name (Q: unnamed)
    tifffile.imwrite(tif, SOURCE.transpose(2, 3, 1, 0), metadata={"axes": "QQQQ"})
    expect = SOURCE[[1, 0]][(slice(None), *BOX)]
    for path, c, z in ((uri, 1, 0), (tif, 3, 2)):
        vol = open_volume(path, channels=[1, 0], channel_axis=c, z_axis=z)
        np.testing.assert_array_equal(vol.read(BOX), expect)
    assert open_volume(uri, axes="zcyx", channel_axis=1, z_axis=0, channels=[0]).shape == (12, 16, 20)  # agreeing


@pytest.mark.parametrize("kwargs, words", [
    (dict(axes="zcyx", channel_axis=0), "--channel-axis 0 disagrees with the axes 'zcyx'.*its channel axis is 1"),
    (dict(z_axis=4), "--z-axis 4 is not an axis of input .* which has 4"),
    (dict(channel_axis=1, z_axis=1), "both name axis 1"),
])
def test_bad_channel_and_z_axis_are_refused(tmp_path, kwargs, words):
    uri = str(tmp_path / "zcyx.zarr")
    create_array(uri, shape=(12, 2, 16, 20), chunks=(4, 1, 8, 8), dtype="uint16")
    with pytest.raises(UserError, match=words):
        open_volume(uri, **kwargs)


def test_channel_axis_must_agree_with_ome_metadata(inputs):
    with pytest.raises(UserError, match="--channel-axis 1 disagrees with the axes 'czyx'"):
        open_volume(inputs["local", "ome-zarr-0.5"], channel_axis=1, channels=[0])
    assert open_volume(inputs["local", "ome-zarr-0.5"], channel_axis=0, z_axis=1, channels=[0]).nchannels == 1


def test_timepoint_selects_along_t(tmp_path):
    data = np.stack([SOURCE, SOURCE + 1])  # t, c, z, y, x
    uri = str(tmp_path / "tczyx.zarr")
    create_array(uri, shape=data.shape, chunks=(1, 1, 6, 8, 8), dtype=data.dtype)[...] = data
    vol = open_volume(uri, channels=[0], timepoint=1)
    np.testing.assert_array_equal(vol.read(BOX), data[1, [0]][(slice(None), *BOX)])
    with pytest.raises(UserError, match="timepoint 2 is out of range.*2 timepoints"):
        open_volume(uri, channels=[0], timepoint=2)


def test_single_channel_volume_needs_no_channel_choice(tmp_path):
    uri = str(tmp_path / "zyx.zarr")
    create_array(uri, shape=(12, 16, 20), chunks=(5, 8, 8), dtype="float32")[...] = SOURCE[0]
    vol = open_volume(uri)
    assert vol.nchannels == 1 and vol.dtype == np.float32
    np.testing.assert_array_equal(vol.read(BOX)[0], SOURCE[0][BOX])


def test_big_endian_array_reads_as_native(tmp_path):
    uri = str(tmp_path / "be.zarr")
    create_array(uri, shape=(12, 16, 20), chunks=(5, 8, 8), dtype=">u2",
                 zarr_format=2)[...] = SOURCE[0]
    vol = open_volume(uri)
    assert vol.dtype == np.dtype("=u2")
    assert vol.read(BOX).dtype == np.dtype("=u2")
    np.testing.assert_array_equal(vol.read(BOX)[0], SOURCE[0][BOX])


# -- inputs a user can fix -----------------------------------------------------------------
@pytest.mark.parametrize("where", EVERYWHERE)
@pytest.mark.parametrize("name", ["nothing.zarr", "nothing.tif"])
def test_missing_input_is_a_user_error(where, name, tmp_path, request):
    base = request.getfixturevalue("s3_server") if where == "s3" else str(tmp_path)
    with pytest.raises(UserError, match=f"input {base}/{name} does not exist"):
        open_volume(f"{base}/{name}")


@pytest.mark.parametrize("where", EVERYWHERE)
def test_2d_array_asks_for_a_3d_volume(where, tmp_path, request):
    base = request.getfixturevalue("s3_server") + "/flat" if where == "s3" else str(tmp_path)
    uri = f"{base}/plane.zarr"
    create_array(uri, shape=(16, 20), chunks=(8, 8), dtype="uint8")
    with pytest.raises(UserError, match=r"shape \(16, 20\).*3D volume \(Z, Y, X\).*--axes"):
        open_volume(uri)


def test_2d_tiff_asks_for_a_3d_volume(tmp_path):
    path = str(tmp_path / "plane.tif")
    tifffile.imwrite(path, SOURCE[0, 0])
    with pytest.raises(UserError, match=r"shape \(16, 20\).*3D volume"):
        open_volume(path)


@pytest.mark.parametrize("where", EVERYWHERE)
def test_unknown_channel_lists_the_available_ones(inputs, where):
    uri = inputs[where, "ome-zarr-0.5"]
    with pytest.raises(UserError, match=r"channel 'RFP' is not in .*0 \(DAPI\), 1 \(GFP\)"):
        open_volume(uri, channels=["GFP", "RFP"])
    with pytest.raises(UserError, match=r"channel 2 is not in .*2 channels"):
        open_volume(uri, channels=[2])
    with pytest.raises(UserError, match="channel 2 is not in"):
        open_volume(inputs[where, "tiff"], channels=[2])


@pytest.mark.parametrize("fmt", FORMATS)
def test_many_channels_need_a_choice(inputs, fmt):
    with pytest.raises(UserError, match="has 2 channels.*--channels"):
        open_volume(inputs["local", fmt])


def test_more_than_three_channels_are_refused(inputs):
    with pytest.raises(UserError, match="1 to 3 channels"):
        open_volume(inputs["local", "zarr-v3"], channels=[0, 1, 0, 1])


@pytest.mark.parametrize("where", EVERYWHERE)
@pytest.mark.parametrize("dtype", ["bool", "complex64", "int64"])
def test_unsupported_dtype_names_it_and_the_supported_ones(where, dtype, tmp_path, request):
    base = request.getfixturevalue("s3_server") + "/dtype" if where == "s3" else str(tmp_path)
    uri = f"{base}/{dtype}.zarr"
    create_array(uri, shape=(4, 8, 8), chunks=(4, 8, 8), dtype=dtype, fill_value=0)
    with pytest.raises(UserError, match=f"data type {dtype}.*supported: uint8, uint16"):
        open_volume(uri)


def test_unsupported_tiff_dtype(tmp_path):
    path = str(tmp_path / "c.tif")
    tifffile.imwrite(path, np.zeros((3, 8, 8), np.complex64), photometric="minisblack")
    with pytest.raises(UserError, match="data type complex64"):
        open_volume(path)


@pytest.mark.parametrize("where", EVERYWHERE)
def test_level_out_of_range_says_how_many(inputs, where):
    with pytest.raises(UserError, match=r"level 2 is out of range.*2 resolution levels.*0 to 1"):
        open_volume(inputs[where, "ome-zarr-0.4"], level=2, channels=[0])
    with pytest.raises(UserError, match="level 1 is out of range.*single resolution level"):
        open_volume(inputs[where, "zarr-v3"], level=1, channels=[0])
    with pytest.raises(UserError, match="level 1 is out of range.*1 resolution levels"):
        open_volume(inputs[where, "tiff"], level=1, channels=[0])


def test_zarr_group_that_is_not_an_image_lists_its_arrays(tmp_path):
    uri = str(tmp_path / "group.zarr")
    group = zarr.open_group(uri, mode="w")
    group.create_array("raw", shape=(4, 8, 8), dtype="uint16")
    group.create_group("sub").create_array("deep", shape=(4, 8, 8), dtype="uint8")
    with pytest.raises(UserError, match=r"zarr group.*group.zarr/raw \(array.*group.zarr/sub/deep"):
        open_volume(uri)


def test_directory_that_is_not_zarr_is_refused(tmp_path):
    (tmp_path / "pngs").mkdir()
    with pytest.raises(UserError, match="neither a zarr array or group nor a .tif"):
        open_volume(str(tmp_path / "pngs"))


def test_axes_that_contradict_ome_metadata_are_refused(inputs):
    with pytest.raises(UserError, match="contradicts.*'czyx'"):
        open_volume(inputs["local", "ome-zarr-0.5"], axes="zcyx", channels=[0])


def test_axes_that_do_not_fit_the_array_are_refused(inputs):
    with pytest.raises(UserError, match="--axes 'zyx' does not fit .*shape \\(2, 12, 16, 20\\)"):
        open_volume(inputs["local", "zarr-v2"], axes="zyx")


def test_read_outside_the_volume_is_a_bug_not_a_silent_clip(inputs):
    vol = open_volume(inputs["local", "zarr-v3"], channels=[0])
    with pytest.raises(ValueError, match="not inside"):
        vol.read((slice(0, 13), slice(0, 4), slice(0, 4)))


# -- arrays the phases write ---------------------------------------------------------------
@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("where", EVERYWHERE)
def test_create_array_round_trips_with_requested_chunks(where, zarr_format, tmp_path, request):
    base = request.getfixturevalue("s3_server") + "/arrays" if where == "s3" else str(tmp_path)
    uri = f"{base}/flows-v{zarr_format}.zarr"
    arr = create_array(uri, shape=(4, 12, 16, 20), chunks=(4, 6, 8, 8), dtype="float16",
                       zarr_format=zarr_format, attributes={"kind": "flows"})
    data = SOURCE[:, :6, :8, :8].astype(np.float16)
    write_region(arr, (slice(6, 12), slice(8, 16), slice(0, 8)), np.concatenate([data, data]))
    again = open_array(uri)
    assert again.metadata.zarr_format == zarr_format
    assert again.chunks == (4, 6, 8, 8) and again.shape == (4, 12, 16, 20)
    assert again.attrs["kind"] == "flows"
    np.testing.assert_array_equal(
        read_region(again, (slice(6, 12), slice(8, 16), slice(0, 8))), np.concatenate([data, data]))
    assert not read_region(again, (slice(0, 6), slice(0, 8), slice(0, 8))).any()  # fill value


@pytest.mark.parametrize("where", EVERYWHERE)
def test_create_array_refuses_to_overwrite_unless_asked(where, tmp_path, request):
    base = request.getfixturevalue("s3_server") + "/over" if where == "s3" else str(tmp_path)
    uri = f"{base}/labels.zarr"
    create_array(uri, shape=(8, 8, 8), chunks=(4, 4, 4), dtype="uint32")[...] = 7
    with pytest.raises(UserError, match=f"output {uri} already exists.*--overwrite"):
        create_array(uri, shape=(8, 8, 8), chunks=(4, 4, 4), dtype="uint32")
    np.testing.assert_array_equal(open_array(uri)[...], 7)  # untouched
    fresh = create_array(uri, shape=(8, 8, 8), chunks=(8, 8, 8), dtype="uint32", overwrite=True)
    assert fresh.chunks == (8, 8, 8)
    assert not open_array(uri)[...].any()  # old chunks are gone


def test_sharded_array_keeps_chunks_and_shards(tmp_path):
    arr = create_array(str(tmp_path / "s.zarr"), shape=(8, 16, 16), chunks=(4, 4, 4),
                       shards=(8, 8, 8), dtype="uint32")
    arr[...] = 3
    again = open_array(str(tmp_path / "s.zarr"))
    assert again.chunks == (4, 4, 4) and again.shards == (8, 8, 8)
    assert (again[...] == 3).all()


def test_open_array_on_missing_path_or_group(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_array(str(tmp_path / "none.zarr"))
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    with pytest.raises(UserError, match="not a zarr array"):
        open_array(str(tmp_path / "g.zarr"))


# -- OME-Zarr writer -------------------------------------------------------------------------
@pytest.mark.parametrize("zarr_format", [2, 3])
def test_written_ome_zarr_validates_against_ngff_models(zarr_format, tmp_path):
    models = pytest.importorskip("ome_zarr_models")
    from ome_zarr_models.v04.image import Image as Image04
    from ome_zarr_models.v04.image_label import ImageLabel as ImageLabel04
    from ome_zarr_models.v05.image import Image as Image05
    from ome_zarr_models.v05.image_label import ImageLabel as ImageLabel05

    cells = (SOURCE[0] > 2000).astype(np.uint32)
    uri = str(tmp_path / "img.ome.zarr")
    write_ome_zarr(uri, SOURCE, voxel_size=VOXEL, chunks=(1, 6, 8, 8), zarr_format=zarr_format,
                   levels=3, channel_names=NAMES, labels={"cells": cells})
    group = zarr.open_group(uri, mode="r")
    image_cls, label_cls = (Image05, ImageLabel05) if zarr_format == 3 else (Image04, ImageLabel04)
    image = image_cls.from_zarr(group)
    ms = image.attributes.ome.multiscales[0] if zarr_format == 3 else \
        image.attributes.multiscales[0]
    assert [d.path for d in ms.datasets] == ["0", "1", "2"]
    label = label_cls.from_zarr(group["labels/cells"])
    assert label is not None
    assert isinstance(models.open_ome_zarr(group), image_cls)
    vol = open_volume(uri, level=2, channels=["DAPI"])
    assert vol.shape == (12, 4, 5)
    assert vol.voxel_size == pytest.approx((VOXEL[0], 4 * VOXEL[1], 4 * VOXEL[2]))
    np.testing.assert_array_equal(vol.read((slice(None),) * 3), _mean2(_mean2(SOURCE[[0]])))
    labels = open_volume(f"{uri}/labels/cells")
    assert labels.dtype == np.uint32 and labels.voxel_size == pytest.approx(VOXEL)
    np.testing.assert_array_equal(labels.read((slice(None),) * 3)[0], cells)


def test_write_ome_zarr_refuses_to_overwrite(tmp_path):
    uri = str(tmp_path / "img.ome.zarr")
    write_ome_zarr(uri, SOURCE[0])
    with pytest.raises(UserError, match="already exists"):
        write_ome_zarr(uri, SOURCE[0])
    write_ome_zarr(uri, SOURCE[1], overwrite=True)
    np.testing.assert_array_equal(open_volume(uri).read((slice(None),) * 3)[0], SOURCE[1])


def test_hcs_plate_points_to_a_field_image(tmp_path):
    uri = str(tmp_path / "plate.ome.zarr")
    group = zarr.open_group(uri, mode="w")
    group.attrs["ome"] = {"version": "0.5", "plate": {
        "columns": [{"name": "1"}], "rows": [{"name": "B"}],
        "wells": [{"path": "B/1", "rowIndex": 0, "columnIndex": 0}]}}
    with pytest.raises(UserError, match=r"HCS plate.*plate.ome.zarr/B/1/0"):
        open_volume(uri)


def test_the_cli_refuses_disagreeing_axes_in_one_line_and_writes_nothing(tmp_path, refused):
    uri = str(tmp_path / "zcyx.zarr")
    create_array(uri, shape=(12, 2, 16, 20), chunks=(4, 1, 8, 8), dtype="uint16")
    out = tmp_path / "out"
    refused(["plan", uri, str(out), "--axes", "zcyx", "--channel-axis", "0", "--channels", "0"],
            "--channel-axis 0 disagrees with the axes 'zcyx'")
    refused(["plan", uri, str(out), "--z-axis", "-1"], "z_axis")
    assert not out.exists()
