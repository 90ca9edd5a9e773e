"""zseg.engine.synth: synthetic touching cells and their exact Cellpose flows."""


import numpy as np
import pytest
from scipy import ndimage as ndi

from zseg.engine.synth import flows_from_labels, synth_cells

SHAPE = (32, 64, 64)


@pytest.fixture(scope="module")
def cells():
    return synth_cells(SHAPE, diameter=12.0, seed=3)


def _interior(labels):
    """Ids (1-based) of cells that do not touch the volume's faces."""
    ids = []
    for i, sl in enumerate(ndi.find_objects(labels)):
        if sl is not None and all(s.start > 0 and s.stop < n for s, n in zip(sl, labels.shape)):
            ids.append(i + 1)
    return np.array(ids)


def test_output_dtypes_and_shapes(cells):
    image, labels = cells
    assert image.shape == labels.shape == SHAPE
    assert image.dtype == np.uint16 and labels.dtype == np.uint32


def test_same_seed_same_arrays_other_seed_other_arrays(cells):
    image, labels = cells
    image2, labels2 = synth_cells(SHAPE, diameter=12.0, seed=3)
    np.testing.assert_array_equal(image, image2)
    np.testing.assert_array_equal(labels, labels2)
    image3, labels3 = synth_cells(SHAPE, diameter=12.0, seed=4)
    assert not np.array_equal(labels, labels3) and not np.array_equal(image, image3)


@pytest.mark.parametrize("anisotropy", [1.0, 2.0, 2.7])
def test_labels_are_consecutive_and_cells_connected(anisotropy):
    _, labels = synth_cells((16, 48, 48), diameter=10.0, anisotropy=anisotropy, seed=1)
    ids = np.unique(labels)
    np.testing.assert_array_equal(ids, np.arange(ids.size))  # 0 (background), 1..N, no gaps
    conn6 = ndi.generate_binary_structure(3, 1)
    for i, sl in enumerate(ndi.find_objects(labels)):
        assert ndi.label(labels[sl] == i + 1, structure=conn6)[1] == 1


def test_cells_touch_each_other(cells):
    _, labels = cells
    pairs = set()
    for ax in range(3):
        a = np.moveaxis(labels, ax, 0)
        lo, hi = a[:-1].ravel(), a[1:].ravel()
        m = (lo != hi) & (lo > 0) & (hi > 0)
        pairs |= set(zip(np.minimum(lo[m], hi[m]).tolist(), np.maximum(lo[m], hi[m]).tolist()))
    touching = {i for p in pairs for i in p}
    assert len(pairs) > labels.max()  # a contact network, not isolated blobs
    assert len(touching) >= 0.8 * labels.max()


def test_foreground_fraction_follows_fill(cells):
    _, labels = cells
    fg = (labels > 0).mean()
    assert 0.75 < fg <= 0.85
    _, sparse = synth_cells(SHAPE, diameter=12.0, seed=3, fill=0.4)
    assert 0.3 < (sparse > 0).mean() <= 0.4


@pytest.mark.parametrize("diameter", [10.0, 16.0])
def test_cell_sizes_vary_around_the_diameter(diameter):
    _, labels = synth_cells((40, 80, 80), diameter=diameter, seed=2, fill=1.0)
    sizes = np.bincount(labels.ravel())[_interior(labels)]
    eqd = np.cbrt(sizes * 6 / np.pi)
    assert 0.85 * diameter < np.median(eqd) < 1.15 * diameter
    lo, hi = np.percentile(eqd, [10, 90])
    assert hi / lo > 1.2  # varied sizes
    assert hi < 1.6 * diameter and lo > 0.6 * diameter


def test_anisotropy_shrinks_cells_in_z():
    def extents(labels):
        sl = [ndi.find_objects(labels)[i - 1] for i in _interior(labels)]
        return np.array([[s.stop - s.start for s in x] for x in sl], float).mean(axis=0)

    _, iso = synth_cells((48, 64, 64), diameter=12.0, seed=5)
    _, aniso = synth_cells((16, 64, 64), diameter=12.0, anisotropy=3.0, seed=5)
    ez, ey, ex = extents(aniso)
    assert aniso.shape == (16, 64, 64)
    assert 0.2 < ez / ((ey + ex) / 2) < 0.5
    iz, iy, ix = extents(iso)
    assert 0.8 < iz / ((iy + ix) / 2) < 1.25


def test_image_is_brighter_inside_cells(cells):
    image, labels = cells
    assert image[labels > 0].mean() > 2 * image[labels == 0].mean()
    # per-cell brightness varies
    means = ndi.mean(image, labels, np.arange(1, labels.max() + 1))
    assert means.std() / means.mean() > 0.1


def test_membrane_image_is_bright_at_cell_boundaries():
    image, labels = synth_cells(SHAPE, diameter=12.0, seed=3, membrane=True)
    inner = ndi.binary_erosion(labels > 0, iterations=1)
    edge = np.zeros_like(inner)
    for ax in range(3):
        d = np.diff(labels.astype(np.int64), axis=ax) != 0
        edge |= np.pad(d, [(0, 1) if a == ax else (0, 0) for a in range(3)])
    edge &= labels > 0
    core = ndi.binary_erosion(labels > 0, iterations=3) & ~ndi.binary_dilation(edge, iterations=3)
    assert image[edge].mean() > 1.5 * image[core].mean()


@pytest.mark.parametrize(
    "kw", [dict(shape=(4, 4)), dict(diameter=0.5), dict(anisotropy=0.5), dict(fill=0.0), dict(fill=1.5)]
)
def test_bad_parameters_are_refused(kw):
    with pytest.raises(ValueError):
        synth_cells(**kw)


# --- flows_from_labels ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    _, labels = synth_cells((12, 32, 32), diameter=8.0, seed=7)
    return labels, flows_from_labels(labels)


def _inward_cosine(labels, vec):
    """Per-cell mean cosine between the flow and the direction to the cell's centroid."""
    ids = np.arange(1, labels.max() + 1)
    coords = np.indices(labels.shape).astype(float)
    cent = np.stack([ndi.mean(c, labels, ids) for c in coords], axis=1)  # (N, ndim)
    fg = labels > 0
    to_c = cent[labels[fg] - 1].T - coords[:, fg]
    norm = np.linalg.norm(to_c, axis=0)
    ok = norm > 1.5
    cos = (vec[:, fg][:, ok] * to_c[:, ok]).sum(0) / (np.linalg.norm(vec[:, fg][:, ok], axis=0) * norm[ok] + 1e-12)
    lab = labels[fg][ok]
    count = np.bincount(lab, minlength=ids.size + 1)[1:]
    total = np.bincount(lab, weights=cos, minlength=ids.size + 1)[1:]
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)  # nan: cell too small to say


def test_flows_shape_dtype_and_cellprob(small):
    labels, flows = small
    assert flows.shape == (4, *labels.shape) and flows.dtype == np.float32
    np.testing.assert_array_equal(flows[3], np.where(labels > 0, 6.0, -6.0))


def test_flows_have_magnitude_five_inside_and_zero_outside(small):
    labels, flows = small
    mag = np.linalg.norm(flows[:3], axis=0)
    assert np.all(flows[:3][:, labels == 0] == 0)
    inside = mag[labels > 0]
    assert np.mean(np.abs(inside - 5.0) < 1e-3) > 0.97
    assert inside.max() <= 5.0 + 1e-4


def test_flows_point_towards_cell_centres(small):
    labels, flows = small
    cos = _inward_cosine(labels, flows[:3])
    assert np.nanmedian(cos) > 0.7 and np.all(cos[~np.isnan(cos)] > 0)


def test_flows_2d():
    _, labels3 = synth_cells((8, 48, 48), diameter=10.0, seed=9)
    labels = labels3[4]
    flows = flows_from_labels(labels)
    assert flows.shape == (3, 48, 48) and flows.dtype == np.float32
    mag = np.linalg.norm(flows[:2], axis=0)
    assert np.all(mag[labels == 0] == 0) and np.mean(np.abs(mag[labels > 0] - 5) < 1e-3) > 0.95
    lab2 = np.unique(labels, return_inverse=True)[1].reshape(labels.shape)  # consecutive per slice
    assert np.nanmedian(_inward_cosine(lab2, flows[:2])) > 0.7


def test_flows_accept_any_ids_and_leave_input_unchanged():
    labels = np.zeros((6, 10, 10), np.int32)
    labels[1:5, 1:5, 1:5] = 7
    labels[1:5, 5:9, 2:7] = 1000
    before = labels.copy()
    flows = flows_from_labels(labels)
    np.testing.assert_array_equal(labels, before)
    consecutive = flows_from_labels(np.where(labels == 7, 1, np.where(labels == 1000, 2, 0)))
    np.testing.assert_array_equal(flows, consecutive)


def test_flows_of_empty_labels_are_background():
    flows = flows_from_labels(np.zeros((3, 5, 5), np.uint16))
    assert np.all(flows[:3] == 0) and np.all(flows[3] == -6.0)


def test_flows_refuse_float_labels():
    with pytest.raises(ValueError):
        flows_from_labels(np.zeros((3, 5, 5), np.float32))
