"""Tests of zseg.engine.dynamics: chunk invariance of trajectories, Cellpose fidelity, units."""

from __future__ import annotations

import fastremap
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zseg.engine import dynamics as D

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def smooth_field(shape, *, seed, magnitude, sink=0.0, quantize=False):
    """Random smooth float32 flow field (ndim, *shape), optionally with a sink at a random
    point and values rounded to multiples of 1/4 (trajectories then hit exact integers)."""
    rng = np.random.default_rng(seed)
    ndim = len(shape)
    f = np.stack([ndi.gaussian_filter(rng.normal(size=shape), 1.5) for _ in range(ndim)])
    f *= magnitude / max(np.abs(f).max(), 1e-9)
    if sink:
        centre = rng.uniform(0, np.array(shape) - 1)
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
        to_c = centre.reshape((ndim,) + (1,) * ndim) - grid
        f += sink * np.clip(to_c, -1.5, 1.5)
    if quantize:
        f = np.round(f * 4) / 4
    return np.ascontiguousarray(f, dtype=np.float32)


def all_voxels(shape):
    return np.argwhere(np.ones(shape, bool)).astype(np.int64)


def sample_corners(starts, disp, shape):
    """Lower corner, weights and validity of the kernel's sample (Cellpose's position
    ``x * L / (L - 1) - 0.5``, float64 from the global start and the float32 displacement)."""
    scale, shift = D.sampling(shape)
    pos = (starts.astype(np.float64) + disp.astype(np.float64)) * scale - shift
    lower = np.floor(pos)
    u = (pos - lower).astype(np.float32)
    lower = lower.astype(np.int64)
    return lower, u, lower >= 0, lower + 1 <= np.array(shape) - 1


def reference_follow(flow, starts, niter):
    """Plain numpy version of the trajectory rule, whole volume (origin 0), every step
    computed (no cycle skipping), same float32 operation order as the kernel: the flow is
    read where Cellpose reads it, a corner outside the volume reads 0."""
    ndim = flow.shape[0]
    L = np.array(flow.shape[1:])
    s = starts.astype(np.int64)
    d = np.zeros(s.shape, np.float32)
    lo = (-s).astype(np.float32)
    hi = (L - 1 - s).astype(np.float32)
    one = np.float32(1)
    for _ in range(niter):
        a, u, a_ok, b_ok = sample_corners(s, d, tuple(L))
        b = a + 1
        v = np.where(a_ok, one - u, np.float32(0))
        u = np.where(b_ok, u, np.float32(0))
        a = np.clip(a, 0, L - 1)
        b = np.clip(b, 0, L - 1)
        g = np.empty_like(d)
        for c in range(ndim):
            F = flow[c]
            if ndim == 3:
                (a0, a1, a2), (b0, b1, b2) = a.T, b.T
                (u0, u1, u2), (v0, v1, v2) = u.T, v.T
                c00 = F[a0, a1, a2] * v2 + F[a0, a1, b2] * u2
                c01 = F[a0, b1, a2] * v2 + F[a0, b1, b2] * u2
                c10 = F[b0, a1, a2] * v2 + F[b0, a1, b2] * u2
                c11 = F[b0, b1, a2] * v2 + F[b0, b1, b2] * u2
                g[:, c] = (c00 * v1 + c01 * u1) * v0 + (c10 * v1 + c11 * u1) * u0
            else:
                (a0, a1), (b0, b1) = a.T, b.T
                (u0, u1), (v0, v1) = u.T, v.T
                g[:, c] = ((F[a0, a1] * v1 + F[a0, b1] * u1) * v0
                           + (F[b0, a1] * v1 + F[b0, b1] * u1) * u0)
        d = np.minimum(np.maximum(d + g, lo), hi)
    return d


def whole(flow, starts, niter):
    shape = flow.shape[1:]
    return D.follow_flows(flow, starts, niter=niter, origin=(0,) * len(shape),
                          volume_shape=shape)


def make_cells(shape, n, radius, seed):
    """Touching blob cells: each voxel goes to its nearest centre (anisotropic metric per
    cell) when closer than ``radius``, else background."""
    rng = np.random.default_rng(seed)
    ndim = len(shape)
    centres = []
    while len(centres) < n:
        c = rng.uniform(3, np.array(shape) - 3)
        if all(np.linalg.norm(c - e) > 1.2 * radius for e in centres):
            centres.append(c)
    centres = np.array(centres)
    scale = rng.uniform(0.8, 1.25, size=(n, ndim))
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    dist = np.sqrt((((grid[..., None, :] - centres) * scale) ** 2).sum(-1))
    lab = (dist.argmin(-1) + 1).astype(np.int32)
    lab[dist.min(-1) > radius] = 0
    return lab


def voxel_agreement(ref, ours):
    """Fraction of voxels (foreground in either) whose labels agree after mapping each of
    our labels to the reference label it overlaps most."""
    fg = (ref > 0) | (ours > 0)
    pairs, counts = np.unique(np.stack([ours[fg], ref[fg]]), axis=1, return_counts=True)
    best = {}
    for (o, r), c in zip(pairs.T, counts):
        if o and (o not in best or c > best[o][1]):
            best[o] = (r, c)
    lut = np.zeros(int(ours.max()) + 1, dtype=np.int64)
    for o, (r, _) in best.items():
        lut[o] = r
    return float((lut[ours[fg]] == ref[fg]).mean())


# --------------------------------------------------------------------------------------
# follow_flows
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(9, 11, 13), (17, 19)])
def test_follow_flows_matches_plain_numpy_rule(shape):
    """The kernel (with its cycle skipping) gives exactly the values of the plain rule."""
    flow = smooth_field(shape, seed=3, magnitude=1.5, sink=0.8)
    starts = all_voxels(shape)
    for niter in (0, 1, 7, 60):
        disp, escaped = whole(flow, starts, niter)
        assert disp.dtype == np.float32 and disp.shape == starts.shape
        assert not escaped.any()
        np.testing.assert_array_equal(disp, reference_follow(flow, starts, niter))


@pytest.mark.parametrize("shape", [(6, 7, 8), (5, 9)])
def test_follow_flows_follows_cellposes_trajectories(shape):
    """The trajectories of Cellpose's own ``steps_interp`` (``grid_sample`` with
    ``align_corners=False`` on positions normalised by ``L - 1``: voxel ``x`` reads the flow at
    ``x * L / (L - 1) - 0.5``, zero beyond the volume), to float32 rounding."""
    torch = pytest.importorskip("torch")
    from cellpose import dynamics as cpd

    flow = smooth_field(shape, seed=5, magnitude=1.2, sink=0.6)
    starts = all_voxels(shape)
    inds = tuple(starts.T)
    for niter in (1, 5, 20):
        disp, escaped = whole(flow, starts, niter)
        assert not escaped.any()
        theirs = cpd.steps_interp(flow, inds, niter, device=torch.device("cpu"))
        theirs = np.asarray(theirs.cpu() if hasattr(theirs, "cpu") else theirs, dtype=np.float64)
        theirs = theirs.reshape(len(shape), -1).T
        np.testing.assert_allclose(starts + disp, theirs, atol=2e-4 * niter)
    # a constant drift along x, 0.25 per step: a voxel on the volume's first or last plane of
    # an axis is read at 0.5 voxel outside it, half of the read is zero padding
    drift = np.zeros((len(shape), *shape), np.float32)
    drift[-1] = 0.25
    disp, _ = whole(drift, starts, 1)
    edge = (starts == 0) | (starts == np.array(shape) - 1)
    want = 0.25 * np.prod(np.where(edge, 0.5, 1.0), axis=1)
    np.testing.assert_array_equal(disp[:, -1], np.minimum(want, shape[-1] - 1 - starts[:, -1]))
    np.testing.assert_array_equal(disp[:, :-1], 0)


def test_an_axis_of_one_voxel_is_read_at_the_position():
    """Cellpose divides by ``L - 1 = 0`` there; zseg reads that axis at 0 and never moves on it."""
    shape = (1, 6, 7)
    flow = smooth_field(shape, seed=2, magnitude=1.0)
    starts = all_voxels(shape)
    disp, escaped = whole(flow, starts, 10)
    assert not escaped.any() and (disp[:, 0] == 0).all() and np.abs(disp[:, 1:]).max() > 0.5
    np.testing.assert_array_equal(disp, reference_follow(flow, starts, 10))


def test_follow_flows_stays_inside_the_volume():
    shape = (7, 8, 9)
    flow = smooth_field(shape, seed=1, magnitude=4.0)
    starts = all_voxels(shape)
    disp, escaped = whole(flow, starts, 30)
    ends = D.end_points(starts, disp)
    assert not escaped.any()
    assert (ends >= 0).all() and (ends < np.array(shape)).all()
    assert np.abs(disp).max() > 1  # the field really moves points to the borders


def _check_block_invariance(shape, seed, magnitude, sink, quantize, niter, data, device=None):
    flow = smooth_field(shape, seed=seed, magnitude=magnitude, sink=sink, quantize=quantize)
    ndim = len(shape)
    starts = all_voxels(shape)
    ref, ref_esc = whole(flow, starts, niter)
    assert not ref_esc.any()
    # voxels each whole-volume trajectory needs: the corners of the sample inside the volume
    # (lower floor(u_t), upper floor(u_t) + 1) before each step t < niter, and the end voxel
    need_min = D.end_points(starts, ref)
    need_max = need_min.copy()
    for t in range(niter):
        a, _, a_ok, b_ok = sample_corners(starts, whole(flow, starts, t)[0], shape)
        need_min = np.minimum(need_min, np.where(a_ok, a, a + 1))
        need_max = np.maximum(need_max, np.where(b_ok, a + 1, a))
    L = np.array(shape)
    for _ in range(3):
        origin = np.array([data.draw(st.integers(0, n - 1)) for n in shape])
        extent = np.array([data.draw(st.integers(1, n - o)) for n, o in zip(shape, origin)])
        box = tuple(slice(o, o + e) for o, e in zip(origin, extent))
        sub_starts = all_voxels(tuple(extent))
        disp, esc = D.follow_flows(np.ascontiguousarray(flow[(slice(None), *box)]), sub_starts,
                                   niter=niter, origin=origin, volume_shape=shape)
        if device is not None:  # the torch path gives the numba kernel's bits, escapes included
            tdisp, tesc = D.follow_flows(np.ascontiguousarray(flow[(slice(None), *box)]), sub_starts,
                                         niter=niter, origin=origin, volume_shape=shape, device=device)
            np.testing.assert_array_equal(tesc, esc)
            np.testing.assert_array_equal(tdisp.view(np.uint32), disp.view(np.uint32))
        vol_idx = np.ravel_multi_index(tuple((sub_starts + origin).T), shape)
        top = origin + extent - 1
        needs_out = (need_min[vol_idx] < origin).any(1) | (need_max[vol_idx] > top).any(1)
        # escaped exactly when the whole-volume trajectory needs a voxel outside the block
        np.testing.assert_array_equal(esc, needs_out)
        ok = ~esc
        np.testing.assert_array_equal(disp[ok].view(np.uint32), ref[vol_idx][ok].view(np.uint32))
        # end voxels lie in the block; escaped trajectories are clamped into it
        ends = D.end_points(sub_starts, disp)
        assert ((ends >= 0) & (ends <= extent - 1)).all()
        pos = sub_starts[esc] + disp[esc]
        assert ((pos >= 0) & (pos <= extent - 1)).all()
        assert ndim == len(extent)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(3, 12), st.integers(3, 12), st.integers(3, 12)),
    seed=st.integers(0, 2**32 - 1),
    magnitude=st.floats(0.1, 3.0),
    sink=st.sampled_from([0.0, 0.5, 1.0]),
    quantize=st.booleans(),
    niter=st.integers(0, 40),
    data=st.data(),
)
def test_follow_flows_is_block_invariant_3d(shape, seed, magnitude, sink, quantize, niter, data):
    _check_block_invariance(shape, seed, magnitude, sink, quantize, niter, data)


#: Random smooth 2D flow fields and blocks of them (hypothesis strategies).
PLANE_FIELDS = dict(
    shape=st.tuples(st.integers(3, 20), st.integers(3, 20)),
    seed=st.integers(0, 2**32 - 1),
    magnitude=st.floats(0.1, 3.0),
    sink=st.sampled_from([0.0, 1.0]),
    quantize=st.booleans(),
    niter=st.integers(0, 40),
    data=st.data(),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**PLANE_FIELDS)
def test_follow_flows_is_block_invariant_2d(shape, seed, magnitude, sink, quantize, niter, data):
    _check_block_invariance(shape, seed, magnitude, sink, quantize, niter, data)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**PLANE_FIELDS)
def test_the_2d_kernel_equals_the_3d_kernel_on_one_plane(shape, seed, magnitude, sink, quantize, niter, data):
    """The 2D kernel stays a kernel of its own (the 3D one costs 20 % more on a plane:
    benchmarks/kernel2d.py), so it is pinned to the 3D kernel: the same plane as a volume one voxel
    deep, with zero Z flow, gives the same end voxels and escapes, in any block of the plane."""
    flow = smooth_field(shape, seed=seed, magnitude=magnitude, sink=sink, quantize=quantize)
    lo = [data.draw(st.integers(0, n - 1)) for n in shape]
    hi = [data.draw(st.integers(a + 1, n)) for a, n in zip(lo, shape)]
    block = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = np.ascontiguousarray(flow[(slice(None), *block)])
    starts = all_voxels(sub.shape[1:])
    d2, e2 = D.follow_flows(sub, starts, niter=niter, origin=lo, volume_shape=shape)
    lifted = np.concatenate([np.zeros((1, 1, *sub.shape[1:]), np.float32), sub[:, None]])
    starts3 = np.concatenate([np.zeros((len(starts), 1), np.int64), starts], axis=1)
    d3, e3 = D.follow_flows(lifted, starts3, niter=niter, origin=(0, *lo), volume_shape=(1, *shape))
    np.testing.assert_array_equal(e2, e3)
    np.testing.assert_array_equal(np.floor(d2), np.floor(d3[:, 1:]))
    assert not d3[:, 0].any()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.one_of(st.tuples(st.integers(3, 10), st.integers(3, 10), st.integers(3, 10)),
                    st.tuples(st.integers(3, 16), st.integers(3, 16))),
    seed=st.integers(0, 2**32 - 1),
    magnitude=st.floats(0.1, 3.0),
    sink=st.sampled_from([0.0, 1.0]),
    niter=st.integers(0, 25),
    data=st.data(),
)
def test_follow_flows_on_torch_equals_the_kernel_and_is_block_invariant(shape, seed, magnitude, sink, niter, data):
    """The GPU path's arithmetic, run on the CPU: the numba kernel's bits in every block."""
    _check_block_invariance(shape, seed, magnitude, sink, False, niter, data, device="cpu")


def test_follow_flows_rejects_bad_arguments():
    flow = np.zeros((3, 4, 4, 4), np.float32)
    starts = np.zeros((1, 3), np.int64)
    kw = dict(origin=(0, 0, 0), volume_shape=(4, 4, 4))
    with pytest.raises(ValueError, match="niter=-1"):
        D.follow_flows(flow, starts, niter=-1, **kw)
    with pytest.raises(ValueError, match="inside the block"):
        D.follow_flows(flow, starts + 4, niter=1, **kw)
    with pytest.raises(ValueError, match="inside the volume"):
        D.follow_flows(flow, starts, niter=1, origin=(1, 0, 0), volume_shape=(4, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        D.follow_flows(flow, starts[:, :2], niter=1, **kw)


# --------------------------------------------------------------------------------------
# prepare_flows, end_points, histogram
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_prepare_flows_masks_and_scales(dtype):
    rng = np.random.default_rng(0)
    dP = rng.normal(scale=5, size=(3, 5, 6, 7)).astype(dtype)
    cellprob = rng.normal(size=(5, 6, 7)).astype(np.float32)
    flow, fg = D.prepare_flows(dP, cellprob, cellprob_threshold=0.3)
    np.testing.assert_array_equal(fg, cellprob > 0.3)
    expected = (dP.astype(np.float32) * fg) / np.float32(5)
    assert flow.dtype == np.float32 and flow.flags.c_contiguous
    np.testing.assert_array_equal(flow, expected)


def test_prepare_flows_smooths_per_axis():
    rng = np.random.default_rng(1)
    dP = rng.normal(size=(3, 8, 9, 10)).astype(np.float32)
    cellprob = np.ones((8, 9, 10), np.float32)
    flow, _ = D.prepare_flows(dP, cellprob, flow3D_smooth=(0, 0, 2))
    for c in range(3):
        expected = ndi.gaussian_filter1d(dP[c], 2, axis=2, mode="reflect") / np.float32(5)
        np.testing.assert_allclose(flow[c], expected, rtol=1e-5, atol=1e-6)
    # a scalar sigma smooths every axis alike
    flow1, _ = D.prepare_flows(dP, cellprob, flow3D_smooth=1.5)
    expected = ndi.gaussian_filter(dP[1], 1.5, mode="reflect") / np.float32(5)
    np.testing.assert_allclose(flow1[1], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="flow3D_smooth"):
        D.prepare_flows(dP, cellprob, flow3D_smooth=(1, 2))
    with pytest.raises(ValueError, match="flow3D_smooth"):
        D.prepare_flows(dP, cellprob, flow3D_smooth=-1)
    with pytest.raises(ValueError, match="cellprob"):
        D.prepare_flows(dP, cellprob[1:])
    bad = dP.copy()
    bad[0, 1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        D.prepare_flows(bad, cellprob)


def test_end_points_and_histogram():
    starts = np.array([[5, 5], [5, 5], [0, 3]], np.int64)
    disp = np.array([[-0.5, 2.999], [0.0, -0.0], [0.25, -3.0]], np.float32)
    ends = D.end_points(starts, disp)
    np.testing.assert_array_equal(ends, [[4, 7], [5, 5], [0, 0]])
    assert ends.dtype == np.int64
    h = D.histogram(np.array([[4, 7], [4, 7], [0, 0]]), (6, 8))
    assert h.dtype == np.int32 and h.shape == (6, 8)
    assert h[4, 7] == 2 and h[0, 0] == 1 and h.sum() == 3
    with pytest.raises(ValueError):
        D.histogram(np.array([[6, 0]]), (6, 8))
    with pytest.raises(ValueError):
        D.histogram(np.array([[0, -1]]), (6, 8))


# --------------------------------------------------------------------------------------
# seeds, growth, painting, holes
# --------------------------------------------------------------------------------------


def test_find_seeds_hand_made():
    h = np.zeros((20, 20), np.int32)
    h[2, 2] = 10  # not above 10: no seed
    h[2, 10] = 11  # a seed
    h[8, 3] = h[8, 4] = 15  # a plateau: both are maxima of their window
    h[15, 10] = 30
    h[15, 12] = 29  # within 2 voxels of a larger count: no seed
    h[15, 15] = 29  # 5 voxels away (3 from the window edge): a seed
    h[19, 19] = 12  # at the corner: window clipped
    seeds, counts = D.find_seeds(h)
    assert seeds.dtype == np.int64 and counts.dtype == np.int32
    np.testing.assert_array_equal(seeds, [[2, 10], [8, 3], [8, 4], [15, 10], [15, 15], [19, 19]])
    np.testing.assert_array_equal(counts, [11, 15, 15, 30, 29, 12])
    # `within` restricts where seeds may be, but the window still looks outside it
    h2 = h.copy()
    h2[17, 19] = 50
    seeds, counts = D.find_seeds(h2, within=(slice(0, 19), slice(0, 20)))
    np.testing.assert_array_equal(seeds, [[2, 10], [8, 3], [8, 4], [15, 10], [15, 15], [17, 19]])
    seeds, _ = D.find_seeds(h2, within=(slice(10, None), slice(12, 20)))
    np.testing.assert_array_equal(seeds, [[15, 15], [17, 19]])


def test_find_seeds_3d_matches_maximum_filter():
    rng = np.random.default_rng(5)
    h = rng.poisson(4, size=(9, 10, 11)).astype(np.int32) * rng.integers(0, 4, size=(9, 10, 11))
    hmax = ndi.maximum_filter(h, size=5, mode="constant", cval=0)
    expected = np.argwhere((h == hmax) & (h > 10))
    seeds, counts = D.find_seeds(h)
    np.testing.assert_array_equal(seeds, expected)
    np.testing.assert_array_equal(counts, h[tuple(expected.T)])
    assert len(seeds) > 3


def reference_grow(h, seeds):
    """Cellpose's growth with scipy: 11^ndim zero-padded window, 5 dilations, keep h > 2."""
    ndim = h.ndim
    hp = np.pad(h, 5)
    out = []
    for s in seeds:
        win = hp[tuple(slice(c, c + 11) for c in s)]
        m = np.zeros((11,) * ndim, bool)
        m[(5,) * ndim] = True
        for _ in range(5):
            m = ndi.binary_dilation(m, structure=np.ones((3,) * ndim, bool)) & (win > 2)
        out.append(m)
    return np.array(out).reshape((len(seeds),) + (11,) * ndim)


@pytest.mark.parametrize("shape", [(30, 31), (14, 15, 16)])
def test_grow_seeds_matches_reference(shape):
    rng = np.random.default_rng(2)
    h = (rng.poisson(3, size=shape) * (rng.random(shape) < 0.7)).astype(np.int32)
    seeds = np.array([[0] * len(shape), [s - 1 for s in shape], [s // 2 for s in shape],
                      [2] + [s - 3 for s in shape[1:]]], np.int64)
    h[tuple(seeds.T)] = 20
    regions = D.grow_seeds(h, seeds)
    assert regions.shape == (4,) + (11,) * len(shape) and regions.dtype == bool
    np.testing.assert_array_equal(regions, reference_grow(h, seeds))


def test_grow_seeds_respects_threshold_and_connectivity():
    h = np.zeros((21, 21), np.int32)
    h[10, 10] = 20
    h[10, 11:18] = 3  # a chain of bins above 2: reached up to 5 steps
    h[9, 9] = h[8, 8] = 3  # diagonal neighbours count (full 3x3 neighbourhood)
    h[12, 10] = 3  # behind a bin with count 2: not reached
    h[11, 10] = 2
    h[13, 13] = 9  # populated but not connected
    (reg,) = D.grow_seeds(h, np.array([[10, 10]]))
    got = {tuple(p) for p in np.argwhere(reg) + 5}  # window -> array coordinates
    expected = {(10, 10), (9, 9), (8, 8)} | {(10, x) for x in range(11, 16)}
    assert got == expected


def test_paint_regions_priority_and_clipping():
    seeds = np.array([[10, 10], [10, 12], [3, 3]], np.int64)
    regions = np.zeros((3, 11, 11), bool)
    regions[:, 3:8, 3:8] = True  # a 5x5 square around each seed
    labels = np.array([7, 8, 9], np.uint32)
    out = D.paint_regions((12, 16), (2, 1), seeds, regions, labels, np.array([5, 3, 1]))
    assert out.dtype == np.uint32 and out.shape == (12, 16)
    # seed 0 (priority 5) wins the overlap with seed 1 (priority 3)
    assert out[10 - 2, 11 - 1] == 7 and out[10 - 2, 14 - 1] == 8 and out[10 - 2, 8 - 1] == 7
    # seed 2's square is clipped by the box's origin (2, 1)
    np.testing.assert_array_equal(np.argwhere(out == 9).min(0), [0, 0])
    assert (out == 9).sum() == 4 * 5  # rows 2..5, columns 1..5
    # equal priorities: the later seed is painted last and wins
    out = D.paint_regions((20, 20), (0, 0), seeds, regions, labels, np.array([1, 1, 1]))
    assert out[10, 11] == 8
    out = D.paint_regions((20, 20), (0, 0), seeds[::-1], regions, labels[::-1], np.ones(3))
    assert out[10, 11] == 7


def test_fill_holes_fills_voids_over_inner_cells_and_leaves_open_notches():
    lab = np.zeros((12, 12, 12), np.uint32)
    lab[1:11, 1:11, 1:11] = 4  # a hollow cube ...
    lab[3:9, 3:9, 3:9] = 0
    lab[4:7, 4:7, 4:7] = 9  # ... holding another cell, and an empty void around it
    lab[0:2, 5, 5] = 0  # a notch open to the outside is not a hole
    lab[1, 1, 1] = 0
    before = lab.copy()
    out = D.fill_holes(lab)
    np.testing.assert_array_equal(lab, before)  # input untouched
    assert (out[3:9, 3:9, 3:9] == 4).all()  # the void and the cell in it (Cellpose's fill)
    assert out[1, 5, 5] == 0 and out[1, 1, 1] == 0
    outside = (before != 0) & (before != 9)
    np.testing.assert_array_equal(out[outside], before[outside])
    # 2D: a ring around a pixel of another cell and a void
    ring = np.zeros((7, 7), np.int64)
    ring[1:6, 1:6] = 2
    ring[2:5, 2:5] = 0
    ring[3, 3] = 1
    filled = D.fill_holes(ring)
    assert (filled[1:6, 1:6] == 2).all() and filled.sum() == 2 * 25


def test_inputs_are_not_modified():
    rng = np.random.default_rng(9)
    shape = (6, 7, 8)
    dP = rng.normal(size=(3, *shape)).astype(np.float32)
    cellprob = rng.normal(size=shape).astype(np.float32)
    args = [dP, cellprob]
    flow, fg = D.prepare_flows(dP, cellprob, flow3D_smooth=1)
    starts = np.argwhere(fg)
    args += [flow, starts]
    disp, _ = whole(flow, starts, 5)
    args.append(disp)
    ends = D.end_points(starts, disp)
    h = (rng.poisson(6, size=shape) * 3).astype(np.int32)
    args += [ends, h]
    seeds, counts = D.find_seeds(h, within=(slice(1, 5), slice(None), slice(None)))
    regions = D.grow_seeds(h, seeds)
    labels = np.arange(1, len(seeds) + 1, dtype=np.uint32)
    args += [seeds, counts, regions, labels]
    copies = [a.copy() for a in args]
    D.prepare_flows(dP, cellprob, flow3D_smooth=1)
    whole(flow, starts, 5)
    D.end_points(starts, disp)
    D.histogram(ends, shape)
    D.find_seeds(h, within=(slice(1, 5), slice(None), slice(None)))
    D.grow_seeds(h, seeds)
    painted = D.paint_regions(shape, (0, 0, 0), seeds, regions, labels, counts)
    D.fill_holes(painted)
    D.compute_masks(dP, cellprob, niter=5, min_size=0)
    for a, c in zip(args, copies):
        np.testing.assert_array_equal(a, c)
    assert len(seeds) > 0


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16])
def test_seed_functions_accept_integer_dtypes(dtype):
    rng = np.random.default_rng(4)
    h32 = (rng.poisson(3, size=(8, 9, 10)) * rng.integers(0, 5, size=(8, 9, 10))).astype(np.int32)
    seeds32, counts32 = D.find_seeds(h32)
    seeds, counts = D.find_seeds(h32.astype(dtype))
    np.testing.assert_array_equal(seeds, seeds32)
    np.testing.assert_array_equal(counts, counts32)
    np.testing.assert_array_equal(D.grow_seeds(h32.astype(dtype), seeds),
                                  D.grow_seeds(h32, seeds))


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64, np.int32])
def test_paint_and_fill_keep_the_label_dtype(dtype):
    seeds = np.array([[5, 5, 5]], np.int64)
    regions = np.zeros((1, 11, 11, 11), bool)
    regions[0, 2:9, 2:9, 2:9] = True
    regions[0, 4:7, 4:7, 4:7] = False  # a hole
    out = D.paint_regions((11, 11, 11), (0, 0, 0), seeds, regions,
                          np.array([2**31 - 1], dtype), np.zeros(1))
    assert out.dtype == dtype and (out == 2**31 - 1).sum() == 7**3 - 3**3
    filled = D.fill_holes(out)
    assert filled.dtype == dtype and (filled == 2**31 - 1).sum() == 7**3


# --------------------------------------------------------------------------------------
# compute_masks: Cellpose fidelity
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cells3d():
    torch = pytest.importorskip("torch")
    from cellpose import dynamics as cpd

    lab = make_cells((48, 64, 64), 30, 11, seed=0)
    # 200 diffusion steps reach the edge of these cells (Cellpose's default, 6 x the largest
    # extent, gives the same masks and takes 5x longer)
    mu = cpd.masks_to_flows_gpu_3d(lab, device=torch.device("cpu"), niter=200)
    dP = (5 * mu).astype(np.float32)
    cellprob = np.where(lab > 0, 5.0, -5.0).astype(np.float32)
    return lab, dP, cellprob


@pytest.fixture(scope="module")
def cells2d():
    torch = pytest.importorskip("torch")
    from cellpose import dynamics as cpd

    lab = make_cells((160, 192), 45, 13, seed=1)
    mu, _ = cpd.masks_to_flows_gpu(lab, device=torch.device("cpu"))
    dP = (5 * mu).astype(np.float32)
    cellprob = np.where(lab > 0, 5.0, -5.0).astype(np.float32)
    return lab, dP, cellprob


def _fidelity(lab, dP, cellprob, do_3D, capsys):
    from cellpose import dynamics as cpd
    from cellpose import metrics

    dP_before, cp_before = dP.copy(), cellprob.copy()
    ours = D.compute_masks(dP, cellprob, niter=200, min_size=15)
    np.testing.assert_array_equal(dP, dP_before)
    np.testing.assert_array_equal(cellprob, cp_before)
    assert ours.dtype == np.uint32 and ours.shape == lab.shape
    np.testing.assert_array_equal(np.unique(ours), np.arange(ours.max() + 1))
    # Cellpose's compute_masks already calls fill_holes_and_remove_small_masks (min_size > 0)
    extra = {} if do_3D else {"flow_threshold": 0.0}  # 2D flow QC is not part of dynamics
    theirs = cpd.compute_masks(dP, cellprob, niter=200, do_3D=do_3D, min_size=15, **extra)
    ap_gt = metrics.average_precision([lab], [ours])[0][0]
    ap_cp = metrics.average_precision([theirs], [ours])[0][0]
    ap_cp_gt = metrics.average_precision([lab], [theirs])[0][0]
    agree = voxel_agreement(theirs.astype(np.int64), ours.astype(np.int64))
    with capsys.disabled():
        print(f"\n{lab.ndim}D, {lab.max()} cells: AP@0.5/0.75/0.9 ours vs GT {ap_gt}, "
              f"ours vs Cellpose {ap_cp}, Cellpose vs GT {ap_cp_gt}; voxel agreement with "
              f"Cellpose {agree:.5f}")
    assert ap_gt[0] >= 0.95
    assert ap_cp[0] >= 0.99
    assert agree >= 0.99


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_compute_masks_matches_cellpose_3d(cells3d, capsys):
    _fidelity(*cells3d, do_3D=True, capsys=capsys)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_compute_masks_matches_cellpose_2d(cells2d, capsys):
    _fidelity(*cells2d, do_3D=False, capsys=capsys)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_compute_masks_flow_threshold_removes_cellposes_masks(cells2d):
    """2D flow QC: the masks Cellpose's remove_bad_flow_masks drops, and only those."""
    from cellpose import dynamics as cpd
    from cellpose import metrics

    lab, dP, cellprob = cells2d
    rng = np.random.default_rng(3)
    bad = rng.choice(np.arange(1, lab.max() + 1), size=8, replace=False)
    noisy = dP.copy()
    for c in bad:  # scramble part of the flows in 8 cells: high flow error, still one seed
        m = (lab == c) & (rng.random(lab.shape) < 0.5)
        noisy[:, m] = rng.normal(0, 5, (2, int(m.sum()))).astype(np.float32)
    ours0 = D.compute_masks(noisy, cellprob, niter=200, min_size=15)
    ours = D.compute_masks(noisy, cellprob, niter=200, min_size=15, flow_threshold=0.4)
    theirs = cpd.compute_masks(noisy, cellprob, niter=200, do_3D=False, min_size=15, flow_threshold=0.4)
    assert ours.max() < ours0.max()  # the threshold removed cells
    assert ours.max() == theirs.max()
    assert metrics.average_precision([theirs], [ours])[0][0][0] >= 0.99
    assert voxel_agreement(theirs.astype(np.int64), ours.astype(np.int64)) >= 0.99
    with pytest.raises(ValueError, match="2D images only"):
        D.compute_masks(np.zeros((3, 4, 4, 4), np.float32), np.zeros((4, 4, 4), np.float32), flow_threshold=0.4)
    with pytest.raises(ValueError, match="flow_threshold"):
        D.compute_masks(noisy, cellprob, flow_threshold=-1)


def test_compute_masks_size_limits_and_errors(cells3d):
    lab, dP, cellprob = cells3d
    sizes = np.bincount(lab.ravel())[1:]
    full = D.compute_masks(dP, cellprob)
    assert full.max() == lab.max()
    smallest = D.compute_masks(dP, cellprob, max_size=int(np.sort(sizes)[2]))
    assert 1 <= smallest.max() <= 5
    assert not D.compute_masks(dP, cellprob, min_size=int(sizes.max()) + 10).any()
    none = D.compute_masks(dP, np.full_like(cellprob, -1))
    assert none.dtype == np.uint32 and not none.any()
    with pytest.raises(ValueError, match="niter"):
        D.compute_masks(dP, cellprob, niter=2.5)
    with pytest.raises(ValueError, match="min_size"):
        D.compute_masks(dP, cellprob, min_size=-3)
    with pytest.raises(ValueError, match="max_size"):
        D.compute_masks(dP, cellprob, max_size=0)
    with pytest.raises(ValueError, match="shape"):
        D.compute_masks(dP[:2], cellprob)


def test_compute_masks_is_reproducible_from_its_steps(cells3d):
    """compute_masks is exactly the documented chain of the public steps."""
    lab, dP, cellprob = cells3d
    flow, fg = D.prepare_flows(dP, cellprob)
    starts = np.argwhere(fg)
    disp, esc = whole(flow, starts, 200)
    ends = D.end_points(starts, disp)
    h = D.histogram(ends, lab.shape)
    seeds, counts = D.find_seeds(h)
    regions = D.grow_seeds(h, seeds)
    painted = D.paint_regions(lab.shape, (0, 0, 0), seeds, regions,
                              np.arange(1, len(seeds) + 1, dtype=np.uint32), counts)
    labels = np.zeros(lab.shape, np.uint32)
    labels[fg] = painted[tuple(ends.T)]
    labels = D.fill_holes(labels)
    _, renum = np.unique(labels, return_inverse=True)
    np.testing.assert_array_equal(D.compute_masks(dP, cellprob, min_size=0),
                                  renum.reshape(lab.shape).astype(np.uint32))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), ndim=st.sampled_from([2, 3]))
def test_filling_holes_over_enclosed_cells_is_cellposes_fill(seed, ndim):
    """``fill_holes`` is Cellpose's ``fill_holes_and_remove_small_masks`` (its fill
    loop: each label in turn fills its holes over whatever they hold) on nested shells, cells
    in holes, voids and cells touching each other."""
    from cellpose.utils import fill_holes_and_remove_small_masks

    rng = np.random.default_rng(seed)
    shape = (9,) * ndim if ndim == 3 else (24, 24)
    lab = np.zeros(shape, np.uint32)
    grid = np.indices(shape)
    for _ in range(int(rng.integers(1, 6))):
        centre = rng.integers(0, shape[0], size=ndim)
        r = np.sqrt(((grid - centre.reshape((-1,) + (1,) * ndim)) ** 2).sum(axis=0))
        outer, width = rng.uniform(1.5, shape[0] / 2), rng.uniform(0.8, 2.5)
        lab[(r <= outer) & (r > outer - width)] = lab.max() + 1  # a shell (a ring in 2D)
        if rng.random() < 0.6:
            lab[r <= rng.uniform(0.5, max(0.6, outer - width - 1))] = lab.max() + 1  # something inside it
    lab = fastremap.renumber(lab, preserve_zero=True)[0].astype(np.uint32)  # Cellpose's labels are 1..K
    want = fill_holes_and_remove_small_masks(lab.copy(), min_size=-1)
    np.testing.assert_array_equal(D.fill_holes(lab), want)


def test_the_cells_a_hole_fills_over_are_counted_per_enclosing_cell():
    lab = np.zeros((12, 12, 12), np.uint32)
    lab[1:11, 1:11, 1:11] = 4  # a hollow cube ...
    lab[3:9, 3:9, 3:9] = 0
    lab[4:7, 4:7, 4:7] = 9  # ... holding another cell, and an empty void around it
    lab[0, 0, 0] = 2  # a cell outside it
    over, by, count = D.filled_over(lab, [4, 2])
    assert over.tolist() == [9] and by.tolist() == [4] and count.tolist() == [27]
    filled = D.fill_holes(lab)
    assert (filled[3:9, 3:9, 3:9] == 4).all() and filled[0, 0, 0] == 2
