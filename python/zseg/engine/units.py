"""The predict decomposition: every network tile of every view runs once, in units fixed by the
volume's geometry, and the flows do not depend on how the work is split.

Cellpose's network pass (:mod:`zseg.engine.views`) blends overlapping tiles: a network-scale
sample of view ``v`` is ``sum_t w_t(s) y_t(s) / W_v(s)`` over the tiles ``t`` that cover it, with
``w_t`` the taper of tile ``t`` and ``W_v`` the sum of every tile's taper there. A block that ran
every tile touching its core ran the tiles straddling two cores twice (3.5x Cellpose's tile count
at 256-voxel chunks). Here the tiles are split once, independently of the chunking:

* **Units.** Along each axis of the network-scale volume the tiles of the whole-volume grid start
  at fixed places; a unit boundary is the start of every ``n``-th tile (``n`` tiles per unit
  along the axis), so an axis is cut into intervals and the volume into boxes, the units.
* **Each tile once.** A unit runs, for each view, the planes of its own interval along the view's
  plane axis and, along the plane's two axes, the tiles that *start* in its intervals (starts in
  the zero padding count from 0). Every (view, plane, tile) of Cellpose's run belongs to exactly
  one unit: the units together run Cellpose's whole-volume tile count, no more.
* **Exact partial sums.** A tile spills past its unit's box by up to one tile, so a sample near a
  boundary gets contributions from several units. Each contribution
  ``w_t(s) / W_v(s) * y_t(s)`` (float64, from the float32 network output and weights) is rounded
  to a fixed-point integer with :data:`FRACTION_BITS` fractional bits and summed in int64 over
  every tile and view that reaches the sample. Integer addition does not depend on order or
  grouping, so the sum is the same whatever the units, the chunking or the worker count; it is
  converted to float32 once (:func:`to_float`) and resized back to the volume. The result equals
  the exact blend to ~1e-9 (2**-32 per contribution), closer than Cellpose's own float32 blend;
  it agrees with Cellpose's flows to float32 rounding.

A unit's result is its *reach* (its box grown by its tiles' spill, cut to the volume), one int64
array of ``K`` channels: dZ, dY, dX, cellprob (``K = 4``) or, to keep each view's output, the
three channels of each view (``K = 9``; the flows are then sums of these integers, the same
integers). The memory of a unit grows with ``n``, never with the volume
(:func:`tiles_per_unit` picks ``n`` for a budget).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from zseg.engine import resample
from zseg.engine.normalize import Normalization
from zseg.engine.tiles import AxisTiles, taper
from zseg.engine.views import (
    VIEW_AXES,
    VIEWS,
    Geometry,
    augment_tile,
    from_network_scale,
    to_network_scale,
    unaugment_tile,
)

__all__ = ["FRACTION_BITS", "Units", "tiles_per_unit", "unit_bytes", "accumulate", "scale_input", "unit_input",
           "assemble", "combine", "to_float",
           "channels", "predict_block", "predict_plane"]

Box = tuple[slice, slice, slice]

#: Fractional bits of the fixed-point partial sums (a contribution is rounded to 2**-32).
FRACTION_BITS = 32
_SCALE = float(2**FRACTION_BITS)


def channels(keep_views: bool) -> int:
    """Channels of a unit's partial sums: 4 (dZ, dY, dX, cellprob), 9 with each view kept."""
    return 9 if keep_views else 4


@functools.lru_cache(maxsize=64)
def _normalised_taper(tiles: AxisTiles) -> tuple[np.ndarray, ...]:
    """Per tile of one axis, its float32 taper divided by the sum of every tile's taper, over
    the tile's samples inside the axis (float64). The 2D weight of a tile is the outer product of
    its two axes' (the taper is separable, so is its sum)."""
    w = taper(tiles.bsize).astype(np.float32).astype(np.float64)
    total = np.zeros(tiles.n, np.float64)
    for s in tiles.starts:
        lo, hi = max(s, 0), min(s + tiles.bsize, tiles.n)
        total[lo:hi] += w[lo - s : hi - s]
    out = []
    for s in tiles.starts:
        lo, hi = max(s, 0), min(s + tiles.bsize, tiles.n)
        out.append(w[lo - s : hi - s] / total[lo:hi])
    return tuple(out)


def _clamped(tiles: AxisTiles) -> list[int]:
    return [min(max(int(s), 0), tiles.n - 1) for s in tiles.starts]


@dataclass(frozen=True)
class Units:
    """The units of one volume's network pass.

    Attributes
    ----------
    geometry : Geometry
        The whole volume's geometry (tiles of each view).
    views : tuple of str
        The views run (:data:`~zseg.engine.views.VIEWS`, or ``("YX",)`` for a 2D image).
    bounds : tuple of 3 tuples of int
        Per axis, the network-scale boundaries ``0 = b_0 < b_1 < ... = L`` of the units.
    """

    geometry: Geometry
    views: tuple[str, ...]
    bounds: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

    @classmethod
    def of(cls, geometry: Geometry, views=VIEWS, tiles=2) -> "Units":
        """Units of ``tiles`` tiles per axis (one int, or one per axis Z, Y, X) of ``geometry``."""
        per = (tiles,) * 3 if isinstance(tiles, (int, np.integer)) else tuple(tiles)
        if len(per) != 3 or min(per) < 1:
            raise ValueError(f"tiles per unit must be >= 1 per axis, got {tiles}")
        bounds = []
        for ax in range(3):
            t = geometry.tiles[ax]
            starts = sorted(set(_clamped(t)))
            cuts = [starts[k] for k in range(int(per[ax]), len(starts), int(per[ax]))]
            bounds.append(tuple(sorted({0, *cuts, t.n})))
        return cls(geometry, tuple(views), tuple(bounds))

    # -- the grid of units ------------------------------------------------------------------
    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return tuple(len(b) - 1 for b in self.bounds)

    def __len__(self) -> int:
        return math.prod(self.grid_shape)

    def position(self, index: int) -> tuple[int, int, int]:
        if not 0 <= index < len(self):
            raise ValueError(f"unit {index} is not one of the {len(self)} units")
        return tuple(int(i) for i in np.unravel_index(index, self.grid_shape))

    def box(self, index: int) -> Box:
        """The unit's own network-scale box (the units' boxes partition the scaled volume)."""
        return tuple(slice(b[j], b[j + 1]) for b, j in zip(self.bounds, self.position(index)))

    # -- what a unit runs -------------------------------------------------------------------
    @functools.cached_property
    def _assignment(self) -> dict[tuple[str, int], tuple[tuple[int, ...], ...]]:
        """Per (view, in-plane axis), per interval of that axis: the tiles that start in it."""
        out = {}
        for v in self.views:
            for axis in VIEW_AXES[v][1:]:
                starts = _clamped(self.geometry.view_tiles(v)[axis])
                b = self.bounds[axis]
                out[v, axis] = tuple(tuple(k for k, s in enumerate(starts) if b[j] <= s < b[j + 1])
                                     for j in range(len(b) - 1))
        return out

    def _assigned(self, view: str, axis: int, j: int) -> tuple[int, ...]:
        return self._assignment[view, axis][j]

    def work(self, index: int) -> list[tuple[str, slice, list[int], list[int]]]:
        """Per view: ``(view, planes, tiles along the plane's first axis, along its second)``;
        planes are network-scale indices along the view's plane axis."""
        pos = self.position(index)
        out = []
        for v in self.views:
            a, b, c = VIEW_AXES[v]
            planes = slice(self.bounds[a][pos[a]], self.bounds[a][pos[a] + 1])
            out.append((v, planes, self._assigned(v, b, pos[b]), self._assigned(v, c, pos[c])))
        return out

    def ntiles(self, index: int) -> int:
        return sum((p.stop - p.start) * len(kb) * len(kc) for _v, p, kb, kc in self.work(index))

    def nplanes(self, index: int) -> int:
        return sum(p.stop - p.start for _v, p, kb, kc in self.work(index) if kb and kc)

    @property
    def total_tiles(self) -> int:
        """The tiles all units run: per view, the planes times the tiles of each in-plane axis
        (each assigned to one interval), i.e. Cellpose's whole-volume count."""
        total = 0
        for v in self.views:
            a, b, c = VIEW_AXES[v]
            total += self.geometry.scaled[a] * math.prod(
                sum(len(ks) for ks in self._assignment[v, ax]) for ax in (b, c))
        return total

    @functools.cached_property
    def spans(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per axis, per interval: the network-scale samples ``(lo, hi)`` that the tiles of the
        units in that interval reach (a unit's reach is the product of its intervals' spans)."""
        out = []
        for axis, b in enumerate(self.bounds):
            n = self.geometry.scaled[axis]
            per = []
            for j in range(len(b) - 1):
                hi = b[j + 1]
                for v in self.views:
                    if axis in VIEW_AXES[v][1:]:
                        t = self.geometry.view_tiles(v)[axis]
                        hi = max([hi, *(min(t.starts[k] + t.bsize, n) for k in self._assigned(v, axis, j))])
                per.append((b[j], hi))
            out.append(tuple(per))
        return tuple(out)

    def reach(self, index: int) -> Box:
        """The network-scale samples the unit's tiles reach (its box and their spill)."""
        return tuple(slice(*self.spans[ax][j]) for ax, j in enumerate(self.position(index)))

    def read(self, index: int) -> Box:
        """The input voxels that resizing to the unit's reach reads."""
        g = self.geometry
        return tuple(slice(*resample.source_range(n, ns, r.start, r.stop))
                     for r, n, ns in zip(self.reach(index), g.shape, g.scaled))

    def meeting(self, box: Box) -> list[int]:
        """The units whose reach overlaps the network-scale ``box``, in index order."""
        per_axis = [[j for j, (lo, hi) in enumerate(self.spans[ax]) if lo < s.stop and s.start < hi]
                     for ax, s in enumerate(box)]
        return sorted(int(np.ravel_multi_index(p, self.grid_shape)) for p in itertools.product(*per_axis))

    def out_box(self, core: Box) -> Box:
        """The network-scale samples that resizing back to the voxels ``core`` reads."""
        g = self.geometry
        return tuple(slice(*resample.source_range(ns, n, s.start, s.stop))
                     for s, n, ns in zip(core, g.shape, g.scaled))


def unit_bytes(units: Units, nchannels: int, keep_views: bool = False) -> int:
    """Host memory a predict task needs for the largest unit: two units' int64 sums (the writer
    stores the previous unit's while the device fills this one's), this unit's input at network
    scale, and two units' input as read and normalised (the reader prepares the next one), all
    float32. A reach is a product of one interval per axis, so the largest is the product of each
    axis's largest (no unit is enumerated). The network's own memory is not counted."""
    g = units.geometry
    reach, read = 1, 1
    for ax, spans in enumerate(units.spans):
        reach *= max(hi - lo for lo, hi in spans)
        read *= max(b - a for a, b in (resample.source_range(g.shape[ax], g.scaled[ax], lo, hi) for lo, hi in spans))
    return reach * (2 * 8 * channels(keep_views) + 4 * nchannels) + 2 * read * 8 * nchannels


def tiles_per_unit(geometry: Geometry, budget: int, *, views=VIEWS, nchannels: int = 1,
                   keep_views: bool = False) -> int:
    """The most tiles per axis (at least 1) whose units fit in ``budget`` bytes (:func:`unit_bytes`)."""
    longest = max(len(geometry.tiles[ax]) for ax in range(3))
    best = 1
    for n in range(2, longest + 1):
        if unit_bytes(Units.of(geometry, views, n), nchannels, keep_views) > budget:
            break
        best = n
    return best


# -- running a unit -----------------------------------------------------------------------------
def _tile_box(tiles: AxisTiles, k: int) -> tuple[int, int, int]:
    s = tiles.starts[k]
    return s, max(s, 0), min(s + tiles.bsize, tiles.n)


def _forward(net, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = net(x.to(dtype))
    if isinstance(y, (tuple, list)):  # Cellpose's networks also return a style vector
        y = y[0]
    return y.float()


def accumulate(units: Units, index: int, scaled: torch.Tensor | None, *, net=None, net_ortho=None,
               batch_size: int = 8, dtype: torch.dtype | None = None, keep_views: bool = False,
               constant: tuple[float, float, float] | None = None, device=None) -> torch.Tensor:
    """Run unit ``index`` and return its fixed-point partial sums over its reach.

    Parameters
    ----------
    units : Units
    index : int
    scaled : (C, Z', Y', X') torch.Tensor, float32, or None
        The normalised input resized to the unit's reach (:func:`unit_input`); None with ``constant``.
    net, net_ortho : callable
        ``(B, C, bs, bs) -> (B, 3, bs, bs)`` (or a tuple whose first item is that); ``net_ortho``
        runs the ZY and ZX views when given (Cellpose 3's ``pretrained_model_ortho``).
    batch_size : int
        Tiles per network call; the tiles of all views that one network runs are batched together.
    dtype : torch.dtype
        The network's compute type (default: its ``dtype`` attribute, else float32).
    keep_views : bool
        Keep each view's three channels (``K = 9``) instead of their sums (``K = 4``).
    constant : (3,) floats, optional
        Take every tile's output to be this constant instead of running a network (a skipped unit).

    Returns
    -------
    (K, *reach) torch.Tensor of int64, on ``scaled``'s device (or ``device``)

    Notes
    -----
    A network's output for one tile can depend on the *size* of the batch it runs in (a batch of
    8 and single tiles differ by ~1e-6 in float32 on a CPU: the kernels block the work by batch
    size), though not on the other tiles in it. So every call gets exactly ``batch_size`` tiles,
    the last batch of a unit padded with zero tiles whose outputs are dropped: each tile's output
    is then the same whatever unit it runs in, and the flows the same bytes for any units.
    """
    g = units.geometry
    reach = units.reach(index)
    dev = scaled.device if scaled is not None else torch.device(device or "cpu")
    acc = torch.zeros((channels(keep_views), *(s.stop - s.start for s in reach)), dtype=torch.int64, device=dev)
    groups: dict[tuple, list] = {}  # tiles of one network and one size go in the same batches
    for vi, (v, planes, kbs, kcs) in enumerate(units.work(index)):
        vnet = net if v == "YX" or net_ortho is None else net_ortho
        _a, b, c = VIEW_AXES[v]
        size = (g.view_tiles(v)[b].bsize, g.view_tiles(v)[c].bsize)
        jobs = groups.setdefault((id(vnet), size), [vnet])
        jobs.extend((vi, v, p, kb, kc) for p in range(planes.start, planes.stop) for kb in kbs for kc in kcs)
    for vnet, *jobs in groups.values():
        vdtype = dtype if dtype is not None and vnet is net else getattr(vnet, "dtype", dtype or torch.float32)
        for i in range(0, len(jobs), batch_size):
            batch = jobs[i : i + batch_size]
            if constant is not None:
                y = [torch.tensor(constant, dtype=torch.float32, device=dev)[:, None, None]] * len(batch)
            else:
                x = torch.stack([augment_tile(_tile_input(units, reach, scaled, v, p, kb, kc), kb, kc, g.augment)
                                 for _vi, v, p, kb, kc in batch])
                if len(batch) < batch_size:  # always full batches: see the note on batches above
                    x = torch.cat([x, x.new_zeros((batch_size - len(batch), *x.shape[1:]))])
                with torch.inference_mode():
                    out = _forward(vnet, x, vdtype)
                y = [unaugment_tile(out[j], kb, kc, g.augment) for j, (_vi, _v, _p, kb, kc) in enumerate(batch)]
            for yj, (vi, v, p, kb, kc) in zip(y, batch):
                _add_tile(acc, yj, units, reach, vi, v, p, kb, kc, keep_views)
    return acc


def _tile_input(units: Units, reach: Box, scaled: torch.Tensor, view: str, p: int, kb: int, kc: int) -> torch.Tensor:
    """The network input of one tile: the scaled input under it, zeros outside the volume."""
    a, b, c = VIEW_AXES[view]
    tb, tc = units.geometry.view_tiles(view)[b], units.geometry.view_tiles(view)[c]
    sb, lob, hib = _tile_box(tb, kb)
    sc, loc, hic = _tile_box(tc, kc)
    x = torch.zeros((scaled.shape[0], tb.bsize, tc.bsize), dtype=scaled.dtype, device=scaled.device)
    src = [slice(None)] * 4
    src[a + 1] = p - reach[a].start
    src[b + 1] = slice(lob - reach[b].start, hib - reach[b].start)
    src[c + 1] = slice(loc - reach[c].start, hic - reach[c].start)
    x[:, lob - sb : hib - sb, loc - sc : hic - sc] = scaled[tuple(src)]  # b < c: the plane keeps that order
    return x


def _add_tile(acc: torch.Tensor, y: torch.Tensor, units: Units, reach: Box, vi: int, view: str, p: int,
              kb: int, kc: int, keep_views: bool) -> None:
    """Add one tile's weighted output, rounded to fixed point, into the unit's sums."""
    a, b, c = VIEW_AXES[view]
    tb, tc = units.geometry.view_tiles(view)[b], units.geometry.view_tiles(view)[c]
    sb, lob, hib = _tile_box(tb, kb)
    sc, loc, hic = _tile_box(tc, kc)
    nb = torch.from_numpy(_normalised_taper(tb)[kb]).to(acc.device)
    nc = torch.from_numpy(_normalised_taper(tc)[kc]).to(acc.device)
    part = y.expand(3, tb.bsize, tc.bsize)[:, lob - sb : hib - sb, loc - sc : hic - sc].double()
    term = torch.round(part * (nb[:, None] * nc[None, :]) * _SCALE).to(torch.int64)
    dest = [slice(None)] * 3
    dest[a] = p - reach[a].start
    dest[b] = slice(lob - reach[b].start, hib - reach[b].start)
    dest[c] = slice(loc - reach[c].start, hic - reach[c].start)
    dest = tuple(dest)
    targets = (3 * vi, 3 * vi + 1, 3 * vi + 2) if keep_views else (b, c, 3)
    for ch, t in zip(targets, term):
        acc[ch][dest] += t


def scale_input(units: Units, index: int, x: torch.Tensor) -> torch.Tensor:
    """Unit ``index``'s normalised input ``x`` (the voxels :meth:`Units.read`) resized to its reach."""
    return to_network_scale(x, units.read(index), units.reach(index), units.geometry)


def unit_input(units: Units, index: int, read, norm, *, device="cpu") -> torch.Tensor:
    """The normalised input of unit ``index`` at network scale over its reach.

    ``read(box) -> (C, z, y, x) ndarray`` reads input voxels; ``norm`` is the volume's
    :class:`~zseg.engine.normalize.Normalization` or a global ``(C, 2)`` lowhigh.
    """
    box = units.read(index)
    x = torch.from_numpy(Normalization.of(norm).apply(read(box), [b.start for b in box])).to(device)
    return scale_input(units, index, x)


# -- assembling the flows -----------------------------------------------------------------------
def combine(units: Units, out: Box, read_unit, nchannels: int) -> np.ndarray:
    """The fixed-point sums of every unit over the network-scale box ``out``.

    ``read_unit(index, box)`` returns unit ``index``'s sums ``(K, ...)`` over ``box`` (coordinates
    inside its reach). Returns ``(K, *out)`` int64.
    """
    acc = np.zeros((nchannels, *(s.stop - s.start for s in out)), np.int64)
    for u in units.meeting(out):
        reach = units.reach(u)
        inter = tuple(slice(max(r.start, o.start), min(r.stop, o.stop)) for r, o in zip(reach, out))
        if any(s.stop <= s.start for s in inter):
            continue
        src = tuple(slice(s.start - r.start, s.stop - r.start) for s, r in zip(inter, reach))
        dst = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(inter, out))
        acc[(slice(None), *dst)] += np.asarray(read_unit(u, src), dtype=np.int64)
    return acc


def assemble(units: Units, core: Box, read_unit, *, keep_views: bool = False):
    """The flows of the voxels ``core`` from the units' sums: :func:`combine` over the network-scale
    samples the core needs, :func:`to_float`, resized back. Returns ``(flows (4, z, y, x), views
    (3, 3, z, y, x) or None)`` float32 and the units that met the core."""
    out = units.out_box(core)
    meeting = units.meeting(out)
    flows, views = to_float(combine(units, out, read_unit, channels(keep_views)), keep_views=keep_views)
    flows = from_network_scale(torch.from_numpy(flows), out, core, units.geometry).numpy()
    if views is not None:
        views = np.stack([from_network_scale(torch.from_numpy(v), out, core, units.geometry).numpy() for v in views])
    return flows, views, meeting


def to_float(acc: np.ndarray, *, keep_views: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Fixed-point sums to float32 flows ``(4, ...)`` (and, from 9 channels, the views ``(3, 3, ...)``).

    The flows of kept views are the same integer sums (dZ = ZY + ZX, dY = YX + ZX, dX = YX + ZY,
    cellprob = all three), so keeping the views never changes the flows.
    """
    acc = np.asarray(acc, dtype=np.int64)
    views = None
    if keep_views:
        ints = np.zeros((4, *acc.shape[1:]), np.int64)
        for vi, v in enumerate(VIEWS):
            _a, b, c = VIEW_AXES[v]
            ints[b] += acc[3 * vi]
            ints[c] += acc[3 * vi + 1]
            ints[3] += acc[3 * vi + 2]
        views = (acc.astype(np.float64) / _SCALE).astype(np.float32).reshape(3, 3, *acc.shape[1:])
        acc = ints
    return (acc.astype(np.float64) / _SCALE).astype(np.float32), views


# -- the whole pass for one block (tests, benchmarks) ------------------------------------------
def predict_block(net, read, core: Box, geometry: Geometry, norm, *, batch_size: int = 8,
                  device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                  keep_views: bool = False, net_ortho=None, views=VIEWS, tiles: int = 2):
    """Cellpose's flows of the voxels ``core``: the units that reach it, run in full, combined.

    This is the predict phase's arithmetic (:func:`accumulate`, :func:`combine`, :func:`to_float`)
    in one call, for tests and benchmarks; the phase runs each unit once for the whole volume.

    Returns ``(flows, views, stats)``: flows ``(4, z, y, x)`` float32 (dZ, dY, dX, cellprob),
    with ``keep_views`` each view's ``(3, 3, z, y, x)`` output (YX, ZY, ZX) else None, and the
    ``planes``/``tiles``/``units`` run. ``norm``: as :func:`unit_input`.
    """
    units = Units.of(geometry, views, tiles)
    done = {}
    for u in units.meeting(units.out_box(core)):
        scaled = unit_input(units, u, read, norm, device=device)
        done[u] = accumulate(units, u, scaled, net=net, net_ortho=net_ortho, batch_size=batch_size, dtype=dtype,
                             keep_views=keep_views).cpu().numpy()
    flows, kept, _ = assemble(units, core, lambda u, box: done[u][(slice(None), *box)], keep_views=keep_views)
    stats = {"planes": sum(units.nplanes(u) for u in done), "tiles": sum(units.ntiles(u) for u in done),
             "units": len(done)}
    return flows, kept, stats


def predict_plane(net, read, core: tuple[slice, slice], geometry: Geometry, norm, *, batch_size: int = 8,
                  device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """Cellpose's 2D flows of the pixels ``core`` of a ``(Y, X)`` image (``geometry`` from
    :meth:`Geometry.plane`; ``read(box) -> (C, y, x)``). Returns ``(flows, stats)``: flows
    ``(3, y, x)`` float32 = dY, dX, cellprob (Cellpose's 2D ``dP`` and cell probability)."""
    if len(core) != 2 or geometry.shape[0] != 1:
        raise ValueError(f"core {core} must be (Y, X) slices of a plane geometry (shape {geometry.shape})")
    flows, _, stats = predict_block(net, lambda box: read(box[1:])[:, None], (slice(0, 1), *core), geometry, norm,
                                    batch_size=batch_size, device=device, dtype=dtype, views=("YX",))
    return flows[1:, 0], stats
