"""Synthetic volumes of touching cells, and the exact Cellpose flows of a label image.

For tests, benchmarks and the README demo: no network weights are reachable here, so the demo
starts from the flows a perfect network would predict (:func:`flows_from_labels`).

:func:`synth_cells` builds cells as a multiplicatively weighted ("power") Voronoi partition of
random seeds: each seed carries a random ellipsoid (radius ±30 % around ``diameter / 2``,
axis ratios up to ~1.6, random orientation); a voxel belongs to the seed with the smallest
*scaled* ellipsoidal distance ``|A⁻¹ Rᵀ (x - c)|`` and is background where that distance is
above 1. Seeds are placed by random sequential addition with a minimum spacing, so
neighbouring ellipsoids overlap and their cells meet in shared faces; random whole cells are
then removed until the foreground fraction is at most ``fill``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

__all__ = ["flows_from_labels", "synth_cells", "synth_multiplex"]

# Seed spacing: two seeds stay at least SPACING * (r_i + r_j) apart. Random sequential addition
# jams at ~38 % volume fraction of the exclusion spheres, which makes the mean cell volume
# close to that of a sphere of the nominal diameter.
_SPACING = 0.78
# Ellipsoid extent (scaled-distance cut) relative to the cell radius: a little above 1 so
# that neighbouring cells touch instead of leaving gaps everywhere.
_EXTENT = 1.45
_CANDIDATES_PER_CELL = 10  # random candidates per expected cell (sequential addition nearly jams)

FLOW_SCALE = 5.0  # Cellpose's network flows are 5 x the unit flow field
CELLPROB_INSIDE = 6.0
CELLPROB_OUTSIDE = -6.0


def synth_cells(
    shape: tuple[int, int, int] = (48, 96, 96),
    *,
    diameter: float = 16.0,
    anisotropy: float = 1.0,
    seed: int = 0,
    fill: float = 0.85,
    noise: float = 0.05,
    membrane: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """A fluorescence-like volume of touching cells and its ground-truth labels.

    Parameters
    ----------
    shape : tuple of 3 int
        ``(Z, Y, X)`` of the returned arrays, in voxels (Z in sampled planes).
    diameter : float
        Mean cell diameter in (isotropic, XY) voxels; single cells vary by ±30 %.
    anisotropy : float
        Z step / XY pixel size (>= 1). The cells are built isotropically on
        ``(round(Z * anisotropy), Y, X)`` and every ``anisotropy``-th plane is kept (nearest).
    seed : int
        Seed of the random generator; equal arguments give identical arrays.
    fill : float in (0, 1]
        Largest fraction of voxels inside cells (whole cells are removed down to it).
    noise : float
        Standard deviation of the additive Gaussian noise, relative to a mean cell's
        brightness (1.0).
    membrane : bool
        Bright cell boundaries with dim interiors (a membrane stain) instead of bright
        smooth interiors (a nuclear/cytoplasmic stain).

    Returns
    -------
    image : (Z, Y, X) ndarray of uint16
        Blurred (Gaussian, sigma 1 voxel) intensities with a background offset of 0.1,
        noise, scaled by 20000.
    labels : (Z, Y, X) ndarray of uint32
        0 = background, cells numbered 1..N consecutively; every cell is 6-connected.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape {shape} must be three positive sizes (Z, Y, X).")
    if not diameter > 1:
        raise ValueError(f"diameter {diameter} must be > 1 voxel.")
    if not anisotropy >= 1:
        raise ValueError(f"anisotropy {anisotropy} must be >= 1 (Z step / XY pixel size).")
    if not 0 < fill <= 1:
        raise ValueError(f"fill {fill} must lie in (0, 1].")
    rng = np.random.default_rng(seed)
    iso = (max(1, round(shape[0] * anisotropy)), shape[1], shape[2])

    centers, radii = _place_seeds(iso, diameter / 2, rng)
    lab, dist = _power_voronoi(iso, centers, radii, rng)

    # keep every anisotropy-th plane (nearest), then clean up what sampling split
    if anisotropy != 1 or iso[0] != shape[0]:
        planes = np.minimum(np.round(np.arange(shape[0]) * anisotropy).astype(np.intp), iso[0] - 1)
        lab, dist = lab[planes], dist[planes]
    lab = _largest_components(lab)
    lab = _remove_to_fill(lab, fill, rng)
    lab = _consecutive(lab)

    nlab = int(lab.max())
    bright = np.concatenate(([0.0], rng.uniform(0.6, 1.4, nlab)))
    fg = lab > 0
    if membrane:
        edge = _boundary(lab)
        signal = np.where(edge, 1.0, np.where(fg, 0.15, 0.0)) * bright[lab]
    else:
        signal = np.where(fg, 1.0 - 0.5 * np.minimum(dist, 1.0) ** 2, 0.0) * bright[lab]
    signal = ndi.gaussian_filter(signal.astype(np.float32), sigma=1.0, mode="nearest")
    signal += np.float32(0.1)
    signal += rng.normal(0.0, noise, size=signal.shape).astype(np.float32)
    image = np.clip(np.rint(signal * 20000.0), 0, 65535).astype(np.uint16)
    return image, lab.astype(np.uint32)


def flows_from_labels(labels: np.ndarray, *, niter: int | None = None) -> np.ndarray:
    """The flows and cell probability a perfect Cellpose network would predict.

    Parameters
    ----------
    labels : (Z, Y, X) or (Y, X) ndarray of int
        0 = background; any positive ids (renumbered internally, the input is not changed).
    niter : int, optional
        Diffusion iterations; None (default) is Cellpose's own choice (3D: 6 x the largest
        sum of a cell's bounding-box sides; 2D: 2 x the largest such sum), which makes the
        field exactly Cellpose's. Fewer iterations are faster but leave far voxels of large
        cells with less accurate directions.

    Returns
    -------
    flows : (4, Z, Y, X) or (3, Y, X) ndarray of float32
        ``dZ, dY, dX`` (2D: ``dY, dX``) = 5 x Cellpose's unit diffusion flow field
        (:func:`cellpose.dynamics.masks_to_flows_gpu_3d` / ``masks_to_flows_gpu`` on the
        CPU), which points from each voxel towards its cell's centre and is 0 outside cells;
        last channel = cell probability logit, +6 inside cells and -6 outside.
    """
    import torch
    from cellpose import dynamics

    lab = np.asarray(labels)
    if lab.ndim not in (2, 3) or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be a 2D or 3D integer array, got {lab.ndim}D {lab.dtype}.")
    lab = _consecutive(lab).astype(np.int64)
    out = np.zeros((lab.ndim + 1, *lab.shape), np.float32)
    if lab.max() > 0:
        cpu = torch.device("cpu")
        if lab.ndim == 3:
            mu = dynamics.masks_to_flows_gpu_3d(lab, device=cpu, niter=niter)
        else:
            mu = dynamics.masks_to_flows_gpu(lab, device=cpu, niter=niter)[0]
        out[:-1] = FLOW_SCALE * mu
    out[-1] = np.where(lab > 0, CELLPROB_INSIDE, CELLPROB_OUTSIDE)
    return out


#: Marker levels of the multiplex slide: integers in [0, MARKER_MAX) (raw units).
MARKER_MAX = 4000
_MIN_NUCLEUS = 15  # pixels: Cellpose's default min_size


def synth_multiplex(
    shape: tuple[int, int] = (512, 512),
    *,
    diameter: float = 24.0,
    markers: int = 4,
    seed: int = 0,
    fill: float = 0.8,
    noise: float = 0.02,
) -> dict:
    """A multiplex slide: cells with one nucleus each, a nuclear, a membrane and marker channels.

    Parameters
    ----------
    shape : (Y, X)
    diameter : float
        Mean cell diameter in pixels (single cells vary by ±30 %); nuclei are about half of it.
    markers : int
        Marker channels after ``DAPI`` and ``Membrane``.
    seed, fill, noise : as :func:`synth_cells`

    Returns
    -------
    dict
        ``image`` (C, Y, X) uint16 with ``channel_names`` (``DAPI``, ``Membrane``, ``M1``...);
        ``cells`` and ``nuclei`` (Y, X) uint32 ground truth with one ID per cell (1..N): every
        nucleus is a disc inside its cell's interior (its pixels and their 4-neighbours are the
        cell's), so matching the truth pairs every cell with its own nucleus; ``levels``
        (markers, N + 1, 2) int64: each marker's value in each cell's nucleus ``[..., 0]`` and
        cytoplasm ``[..., 1]`` (row 0: background). Markers are piecewise constant without
        noise, so those levels are the exact per-cell means; DAPI (bright nuclei) and Membrane
        (bright cell boundaries) are blurred, noisy stains as in :func:`synth_cells`.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape {shape} must be two positive sizes (Y, X).")
    if not diameter > 4:
        raise ValueError(f"diameter {diameter} must be > 4 pixels (a nucleus inside each cell).")
    if int(markers) < 0:
        raise ValueError(f"markers {markers} must be >= 0.")
    if not 0 < fill <= 1:
        raise ValueError(f"fill {fill} must lie in (0, 1].")
    rng = np.random.default_rng(seed)
    centers, radii = _place_seeds(shape, diameter / 2, rng)
    lab, _ = _power_voronoi(shape, centers, radii, rng)
    lab = _remove_to_fill(_largest_components(lab), fill, rng)
    cells = _consecutive(lab)
    nuclei = _nuclei_in(cells)
    # a cell too thin for a nucleus of Cellpose's min_size (15 pixels) is dropped
    keep = np.bincount(nuclei.ravel(), minlength=int(cells.max()) + 1) > _MIN_NUCLEUS
    keep[0] = False
    cells = _consecutive(np.where(keep[cells], cells, 0))
    nuclei = np.where(nuclei > 0, cells, 0).astype(np.uint32)

    n = int(cells.max())
    fg = cells > 0
    bright = np.concatenate(([0.0], rng.uniform(0.6, 1.4, n)))
    dapi = np.where(nuclei > 0, 1.0, 0.0) * bright[nuclei]
    edge = _boundary(cells)
    membrane = np.where(edge, 1.0, np.where(fg, 0.1, 0.0)) * bright[cells]
    stains = []
    for signal in (dapi, membrane):
        signal = ndi.gaussian_filter(signal.astype(np.float32), sigma=1.0, mode="nearest")
        signal += np.float32(0.05) + rng.normal(0.0, noise, size=signal.shape).astype(np.float32)
        stains.append(np.clip(np.rint(signal * 20000.0), 0, 65535).astype(np.uint16))
    levels = rng.integers(0, MARKER_MAX, (int(markers), n + 1, 2))
    levels[:, 0] = 0
    in_nucleus = nuclei > 0
    marker_planes = [np.where(in_nucleus, lv[cells, 0], lv[cells, 1]).astype(np.uint16) for lv in levels]
    image = np.stack(stains + marker_planes)
    names = ["DAPI", "Membrane"] + [f"M{i + 1}" for i in range(int(markers))]
    return {"image": image, "channel_names": names, "cells": cells.astype(np.uint32), "nuclei": nuclei,
            "levels": levels.astype(np.int64)}


# ---------------------------------------------------------------------------------------------
# helpers


def _nuclei_in(cells):
    """A disc per cell around its deepest pixel, radius about half the cell's inscribed radius,
    kept 1.5 pixels from the cell's edge so that it lies in the interior."""
    out = np.zeros(cells.shape, np.uint32)
    for i, sl in enumerate(ndi.find_objects(cells)):
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        mask = cells[sl] == i + 1
        edt = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        py, px = np.unravel_index(int(np.argmax(edt)), edt.shape)
        r_max = float(edt[py, px])
        rho = min(0.55 * r_max, r_max - 1.5)
        if rho < 0:
            continue
        yy, xx = np.ogrid[: mask.shape[0], : mask.shape[1]]
        disc = ((yy - py) ** 2 + (xx - px) ** 2 <= rho * rho) & mask
        out[sl][disc] = i + 1
    return out




def _place_seeds(shape, radius, rng):
    """Random sequential addition: centres ``(N, ndim)`` and radii ``(N,)`` in voxels (2D or 3D)."""
    vol = float(np.prod(shape))
    ball = np.pi / 6 * (2 * radius) ** 3 if len(shape) == 3 else np.pi / 4 * (2 * radius) ** 2
    expected = vol / ball
    m = int(_CANDIDATES_PER_CELL * expected) + 20
    cand = rng.uniform(0, 1, (m, len(shape))) * np.asarray(shape, float) - 0.5
    rad = radius * rng.uniform(0.7, 1.3, m)
    tree = cKDTree(cand)
    pairs = tree.query_pairs(_SPACING * 2 * radius * 1.3, output_type="ndarray")
    if len(pairs):
        d = np.linalg.norm(cand[pairs[:, 0]] - cand[pairs[:, 1]], axis=1)
        pairs = pairs[d < _SPACING * (rad[pairs[:, 0]] + rad[pairs[:, 1]])]
    # for each candidate j, the earlier candidates i < j it conflicts with
    pairs = pairs[np.argsort(pairs[:, 1], kind="stable")]
    starts = np.searchsorted(pairs[:, 1], np.arange(m + 1))
    earlier = pairs[:, 0].tolist()
    accepted = [False] * m
    for j in range(m):
        accepted[j] = not any(accepted[i] for i in earlier[starts[j]:starts[j + 1]])
    keep = np.flatnonzero(accepted)
    return cand[keep], rad[keep]


def _power_voronoi(shape, centers, radii, rng):
    """Label each voxel with the cell of smallest scaled ellipsoidal distance (<= 1).

    3D: ellipsoids of random orientation; 2D: ellipses. Returns labels ``shape`` int32 (1-based,
    in seed order) and that distance (float32).
    """
    n, nd = len(centers), len(shape)
    axes = np.exp(rng.uniform(-0.25, 0.25, (n, nd)))
    if nd == 3:
        axes /= np.cbrt(axes.prod(axis=1))[:, None]  # volume preserving
        rot = Rotation.random(n, random_state=rng).as_matrix() if n else np.zeros((0, 3, 3))
    else:
        axes /= np.sqrt(axes.prod(axis=1))[:, None]  # area preserving
        theta = rng.uniform(0, np.pi, n)
        rot = np.stack([np.stack([np.cos(theta), -np.sin(theta)], 1),
                        np.stack([np.sin(theta), np.cos(theta)], 1)], 1) if n else np.zeros((0, 2, 2))
    semi = axes * (radii * _EXTENT)[:, None]  # (n, nd) semi-axes in voxels
    # x -> scaled coordinates: diag(1/semi) @ R^T @ (x - c)
    fwd = rot.transpose(0, 2, 1) / semi[:, :, None]
    half = np.sqrt(((rot * semi[:, None, :]) ** 2).sum(axis=2))  # bounding-box half extents

    best = np.full(shape, np.inf, np.float32)
    lab = np.zeros(shape, np.int32)
    hi_lim = np.asarray(shape)
    for i in range(n):
        lo = np.maximum(np.floor(centers[i] - half[i]).astype(int), 0)
        hi = np.minimum(np.ceil(centers[i] + half[i]).astype(int) + 1, hi_lim)
        if np.any(hi <= lo):
            continue
        m = fwd[i].astype(np.float32)
        acc = 0
        for k in range(nd):  # sum_k m[:, k] * g_k, axis k broadcast along its own dimension
            g = np.arange(lo[k], hi[k], dtype=np.float32) - np.float32(centers[i][k])
            acc = acc + m[:, k].reshape((nd,) + (1,) * nd) * g.reshape((1,) * (k + 1) + (-1,) + (1,) * (nd - k - 1))
        d = np.sqrt((acc**2).sum(axis=0))
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        win = (d <= 1.0) & (d < best[sl])
        best[sl][win] = d[win]
        lab[sl][win] = i + 1
    return lab, best


def _largest_components(lab):
    """Keep only the largest 6-connected piece of every label (Cellpose flows need connected cells)."""
    out = lab.copy()
    for i, sl in enumerate(ndi.find_objects(lab)):
        if sl is None:
            continue
        mask = lab[sl] == i + 1
        comp, k = ndi.label(mask)
        if k > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            out[sl][mask & (comp != sizes.argmax())] = 0
    return out


def _remove_to_fill(lab, fill, rng):
    """Remove whole random cells until at most ``fill`` of the voxels are foreground."""
    sizes = np.bincount(lab.ravel())
    excess = int(sizes[1:].sum()) - int(np.floor(fill * lab.size))
    if excess <= 0:
        return lab
    ids = np.flatnonzero(sizes[1:]) + 1
    order = rng.permutation(ids)
    removed = np.cumsum(sizes[order])
    drop = order[: int(np.searchsorted(removed, excess)) + 1]
    gone = np.zeros(sizes.size, bool)
    gone[drop] = True
    return np.where(gone[lab], 0, lab)


def _consecutive(lab):
    """Renumber positive labels to 1..N in increasing order of the old ids."""
    lab = np.asarray(lab)
    if lab.size == 0 or lab.max() <= 0:
        return np.zeros(lab.shape, np.uint32)
    if lab.min() < 0:
        raise ValueError(f"labels must be >= 0, found {lab.min()}.")
    present = np.zeros(int(lab.max()) + 1, bool)
    present[lab.ravel()] = True
    present[0] = False
    lut = np.cumsum(present).astype(np.uint32)
    return lut[lab]


def _boundary(lab):
    """Foreground voxels with a 6-neighbour of another label (or background)."""
    edge = np.zeros(lab.shape, bool)
    for ax in range(lab.ndim):
        a = [slice(None)] * lab.ndim
        b = [slice(None)] * lab.ndim
        a[ax], b[ax] = slice(1, None), slice(None, -1)
        diff = lab[tuple(a)] != lab[tuple(b)]
        edge[tuple(a)] |= diff
        edge[tuple(b)] |= diff
    return edge & (lab > 0)
