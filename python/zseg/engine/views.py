"""Cellpose's 3D network pass, computed for one block of a volume exactly as for the whole.

What Cellpose does (``CellposeModel.eval(do_3D=True)``)
-------------------------------------------------------
1. normalise the volume: ``(x - low) / (high - low)`` per channel;
2. resize it by ``rescale = 30 / diameter`` (Cellpose 3: ``diam_mean / diameter``) in Y and X and ``anisotropy * rescale`` in Z
   (``cv2`` linear), to the *network scale* ``(int(Z*anisotropy*rescale), int(Y*rescale),
   int(X*rescale))``;
3. run the network on every YX, ZY and ZX plane of the scaled volume: each *whole plane* is
   zero-padded and cut into overlapping ``bsize`` tiles whose places depend on the plane's
   size (:mod:`zseg.engine.tiles`), and the tile outputs are blended with a taper;
4. sum the three views: ``dZ = ZY + ZX``, ``dY = YX + ZX``, ``dX = YX + ZY``, ``cellprob``
   = the three logits summed;
5. resize the sums back to the volume's shape (``cv2`` linear).

How a block reproduces it
-------------------------
Every step above is a function of *global* coordinates only: the resize of step 2 and 5
places an output sample at a position fixed by the whole axis's lengths
(:mod:`zseg.engine.resample`), and the tiles of step 3 are fixed by the whole plane's size.
So a block never pads, tiles or resizes itself. For the core of a block (the voxels it
writes) it takes, in order:

* ``out`` -- the network-scale samples that resizing back to the core reads (the core itself
  when the scale is 1);
* per view, the planes of ``out`` along the view's plane axis, and in each plane the tiles of
  the *whole-plane* tile grid that overlap ``out`` (:meth:`AxisTiles.covering`); the view's
  ``region`` is those planes times the tiles' extent, cut to the volume (outside it, the
  network sees the zero padding Cellpose adds);
* ``read`` -- the input voxels that resizing to ``region`` reads.

It then normalises ``read`` with the *global* low/high values, resizes it to ``region``,
runs exactly those tiles, blends them into ``out`` with the whole plane's weights (every tile
that touches a sample of ``out`` is among them, so the weights sum as in the whole plane),
sums the views and resizes ``out`` back to the core. The context a block reads is therefore
not a fixed halo but whatever the tiles covering its core need: along an axis, the core
plus up to one tile on each side, and the whole axis for a thin volume whose planes are a
single tile. Cores of any size give Cellpose's flows of the whole volume, to float32
rounding (batch composition, summation order), which float16 storage hides.

Tiles of neighbouring blocks that overlap both cores run once in each block: choosing the
chunk shape near multiples of the tile step keeps that overhead small (the benchmark
reports planes and tiles against Cellpose's own count).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from zseg.engine import resample
from zseg.engine.tiles import AxisTiles, taper

__all__ = [
    "VIEWS",
    "Geometry",
    "ViewPlan",
    "BlockPlan",
    "scaled_shape",
    "plan_block",
    "normalize",
    "to_network_scale",
    "run_view",
    "add_view",
    "from_network_scale",
    "predict_block",
    "predict_plane",
    "PLANE_VIEWS",
    "run_block",
    "view_inputs",
]

Box = tuple[slice, slice, slice]

#: The three views, in the order Cellpose runs and sums them.
VIEWS = ("YX", "ZY", "ZX")
#: The one view of a 2D image (:meth:`Geometry.plane`).
PLANE_VIEWS = ("YX",)
#: Per view: the plane axis, then the plane's two axes (network output channels 0 and 1 are
#: the flows along these). ZY is Cellpose's name for the planes at fixed Y (axes Z, X).
VIEW_AXES = {"YX": (0, 1, 2), "ZY": (1, 0, 2), "ZX": (2, 0, 1)}


def scaled_shape(shape, *, diameter: float, anisotropy: float = 1.0,
                 diam_mean: float = 30.0) -> tuple[int, int, int]:
    """The network-scale shape of a volume, as Cellpose computes it.

    Parameters
    ----------
    shape : (Z, Y, X) tuple of int
    diameter : float
        Cell diameter in YX voxels; the scale is ``diam_mean / diameter``.
    anisotropy : float
        Z voxel size over YX voxel size.
    diam_mean : float
        The network's training diameter: 30 for CPSAM; a Cellpose 3 network stores its own
        (17 for nuclei).

    Returns
    -------
    (Z', Y', X') tuple of int
        ``shape`` unchanged when both scales are 1; ``ValueError`` when an axis would vanish.
    """
    rescale = float(diam_mean) / diameter
    lz, ly, lx = (int(s) for s in shape)
    if rescale == 1.0 and anisotropy == 1.0:
        return (lz, ly, lx)
    out = (int(lz * anisotropy * rescale), int(ly * rescale), int(lx * rescale))
    if min(out) < 1:
        raise ValueError(
            f"diameter {diameter} with anisotropy {anisotropy} shrinks the volume {tuple(shape)} to {out}"
        )
    return out


@dataclass(frozen=True)
class Geometry:
    """The whole volume's network geometry: what every block must agree on.

    Attributes
    ----------
    shape : (Z, Y, X)
        The volume, in voxels.
    scaled : (Z', Y', X')
        The volume at network scale (:func:`scaled_shape`).
    tiles : tuple of 3 AxisTiles
        Tiles along each axis of the scaled volume; the tiles of a plane are the product of
        its two axes' tiles (the same for every view that has the axis).
    augment : bool
        Cellpose's test-time augmentation (flipped overlapping tiles).
    ortho_tiles : tuple of 3 AxisTiles, or None
        Tiles of the ZY and ZX views when a second network runs them (Cellpose 3's
        ``pretrained_model_ortho``, :meth:`with_ortho`) and tiles differently; None: ``tiles``.
    """

    shape: tuple[int, int, int]
    scaled: tuple[int, int, int]
    tiles: tuple[AxisTiles, AxisTiles, AxisTiles]
    augment: bool = False
    ortho_tiles: tuple[AxisTiles, AxisTiles, AxisTiles] | None = None

    @classmethod
    def of(cls, shape, *, diameter: float = 30.0, anisotropy: float = 1.0, bsize: int = 256,
           tile_overlap: float = 0.1, augment: bool = False, diam_mean: float = 30.0,
           pad_to_tile: bool = True) -> "Geometry":
        """``diam_mean`` and ``pad_to_tile=False`` (tiles shorter than ``bsize`` on short
        planes) give a Cellpose 3 network's geometry; the defaults are CPSAM's."""
        shape = tuple(int(s) for s in shape)
        scaled = scaled_shape(shape, diameter=diameter, anisotropy=anisotropy, diam_mean=diam_mean)
        tiles = tuple(AxisTiles.of(n, bsize, tile_overlap=tile_overlap, augment=augment, pad_to_tile=pad_to_tile)
                      for n in scaled)
        return cls(shape, scaled, tiles, augment)

    @classmethod
    def plane(cls, shape, *, diameter: float = 30.0, bsize: int = 256, tile_overlap: float = 0.1,
              augment: bool = False, diam_mean: float = 30.0, pad_to_tile: bool = True) -> "Geometry":
        """The geometry of Cellpose's 2D ``eval`` on a ``(Y, X)`` image, as a one-plane volume
        ``(1, Y, X)`` whose YX view (:data:`PLANE_VIEWS`) is the 2D network pass: the plane is
        resized by ``diam_mean / diameter`` in Y and X only, padded and tiled as a whole plane.
        Its flows (:func:`predict_plane`) equal ``eval(do_3D=False)``'s to float32 rounding."""
        ly, lx = (int(s) for s in shape)
        rescale = float(diam_mean) / diameter
        scaled = (1, ly, lx) if rescale == 1.0 else (1, int(ly * rescale), int(lx * rescale))
        if min(scaled) < 1:
            raise ValueError(f"diameter {diameter} shrinks the image {(ly, lx)} to {scaled[1:]}")
        tiles = tuple(AxisTiles.of(n, bsize, tile_overlap=tile_overlap, augment=augment, pad_to_tile=pad_to_tile)
                      for n in scaled)
        return cls((1, ly, lx), scaled, tiles, augment)

    def with_ortho(self, bsize: int, *, tile_overlap: float = 0.1, pad_to_tile: bool = True) -> "Geometry":
        """This geometry with the ZY and ZX views tiled for an ortho network of tile size
        ``bsize`` (and its family's padding) on the same network-scale volume."""
        tiles = tuple(AxisTiles.of(n, bsize, tile_overlap=tile_overlap, augment=self.augment,
                                   pad_to_tile=pad_to_tile) for n in self.scaled)
        return replace(self, ortho_tiles=None if tiles == self.tiles else tiles)

    def view_tiles(self, view: str) -> tuple[AxisTiles, AxisTiles, AxisTiles]:
        """The tiles along each axis for the planes of ``view``."""
        return self.tiles if view == "YX" or self.ortho_tiles is None else self.ortho_tiles

    @property
    def bsize(self) -> int:
        return self.tiles[0].bsize

    def view_counts(self) -> dict[str, tuple[int, int]]:
        """Per view, ``(planes, tiles)`` of Cellpose's whole-volume run."""
        out = {}
        for v in VIEWS:
            a, b, c = VIEW_AXES[v]
            t = self.view_tiles(v)
            out[v] = (self.scaled[a], self.scaled[a] * len(t[b]) * len(t[c]))
        return out


@dataclass(frozen=True)
class ViewPlan:
    """What one view of one block computes (boxes are half-open, ``(Z, Y, X)`` order).

    Attributes
    ----------
    view : str
        ``"YX"``, ``"ZY"`` or ``"ZX"``.
    tiles : (list of int, list of int)
        Indices of the tiles along the plane's two axes (into ``Geometry.tiles[b]``, ``[c]``).
    canvas : ((int, int), (int, int))
        Extent of those tiles along the plane's two axes (network scale, padding included).
    region : Box
        Network-scale samples the view needs: the planes of ``out``, the tiles' extent cut
        to the volume.
    read : Box
        Input voxels that resizing to ``region`` reads.
    """

    view: str
    tiles: tuple[list[int], list[int]]
    canvas: tuple[tuple[int, int], tuple[int, int]]
    region: Box
    read: Box

    @property
    def axes(self) -> tuple[int, int, int]:
        return VIEW_AXES[self.view]

    @property
    def planes(self) -> int:
        a = self.axes[0]
        return self.region[a].stop - self.region[a].start

    @property
    def ntiles(self) -> int:
        return self.planes * len(self.tiles[0]) * len(self.tiles[1])


@dataclass(frozen=True)
class BlockPlan:
    """The network work of one block: its core, the network-scale ``out`` box, three views."""

    core: Box
    out: Box
    views: tuple[ViewPlan, ...] = field(default_factory=tuple)

    @property
    def planes(self) -> int:
        return sum(v.planes for v in self.views)

    @property
    def ntiles(self) -> int:
        return sum(v.ntiles for v in self.views)

    @property
    def read(self) -> Box:
        """Bounding box of every view's input."""
        return tuple(slice(min(v.read[i].start for v in self.views), max(v.read[i].stop for v in self.views))
                     for i in range(3))


def plan_block(geometry: Geometry, core: Box, views=VIEWS) -> BlockPlan:
    """The tiles, network-scale boxes and input box of each view for the voxels ``core``.

    Parameters
    ----------
    geometry : Geometry
        The whole volume's geometry.
    core : tuple of 3 slice
        The voxels to predict, half-open, inside ``geometry.shape``.
    views : sequence of str
        Views to plan (all three by default).
    """
    core = tuple(slice(int(s.start), int(s.stop)) for s in core)
    for s, n in zip(core, geometry.shape):
        if not 0 <= s.start < s.stop <= n:
            raise ValueError(f"core {core} is not a non-empty box inside the volume {geometry.shape}")
    out = tuple(
        slice(*resample.source_range(ns, n, s.start, s.stop))
        for s, n, ns in zip(core, geometry.shape, geometry.scaled)
    )
    plans = []
    for v in views:
        a, b, c = VIEW_AXES[v]
        region = [None, None, None]
        region[a] = out[a]
        tiles, canvas = [], []
        for ax in (b, c):
            t = geometry.view_tiles(v)[ax]
            ks = t.covering(out[ax].start, out[ax].stop)
            lo, hi = t.span(ks)
            tiles.append(ks)
            canvas.append((lo, hi))
            region[ax] = slice(max(lo, 0), min(hi, geometry.scaled[ax]))
        read = tuple(
            slice(*resample.source_range(n, ns, r.start, r.stop))
            for r, n, ns in zip(region, geometry.shape, geometry.scaled)
        )
        plans.append(ViewPlan(v, (tiles[0], tiles[1]), (canvas[0], canvas[1]), tuple(region), read))
    return BlockPlan(core, out, tuple(plans))


def normalize(data: np.ndarray, lowhigh) -> np.ndarray:
    """Cellpose's fixed normalisation ``(x - low) / (high - low)`` per channel, in float32.

    Parameters
    ----------
    data : (C, ...) ndarray, any real dtype
    lowhigh : (C, 2) array-like of float
        Global low and high values per channel (the percentiles phase's result). A channel
        whose high is not above its low carries no signal: it becomes 0, as Cellpose sets a
        channel it cannot normalise.

    Returns
    -------
    (C, ...) ndarray of float32 (a new array; ``data`` is not modified)
    """
    lh = np.asarray(lowhigh, dtype=np.float64).reshape(-1, 2)
    if lh.shape[0] != data.shape[0]:
        raise ValueError(f"lowhigh has {lh.shape[0]} channels, the data {data.shape[0]}")
    out = data.astype(np.float32, copy=True)
    for c, (lo, hi) in enumerate(lh):
        if not hi > lo:
            out[c] = 0
            continue
        # float64 scalars, in-place float32 results: the arithmetic of Cellpose's normalize_img
        np.subtract(out[c], np.float64(lo), out=out[c])
        np.divide(out[c], np.float64(hi - lo), out=out[c])
    return out


def to_network_scale(x: torch.Tensor, read: Box, region: Box, geometry: Geometry) -> torch.Tensor:
    """Resize normalised input ``x`` (the voxels ``read``) to the network-scale ``region``.

    Parameters
    ----------
    x : (C, z, y, x) torch.Tensor, float32
        Normalised input of the box ``read``.
    read, region : Box
        Volume and network-scale boxes (``read`` must hold what ``region`` reads).
    geometry : Geometry

    Returns
    -------
    (C, Z', Y', X') torch.Tensor, float32, the shape of ``region``
    """
    # Cellpose: cv2 on each YX plane (X, then Y), then cv2 along Z
    for axis, horizontal in ((2, True), (1, False), (0, False)):
        x = resample.resize_axis(
            x, axis + 1, geometry.shape[axis], geometry.scaled[axis], region[axis].start, region[axis].stop,
            read[axis].start, horizontal=horizontal,
        )
    return x


def from_network_scale(y: torch.Tensor, out: Box, core: Box, geometry: Geometry) -> torch.Tensor:
    """Resize network-scale outputs ``y`` (the samples ``out``) back to the voxels ``core``.

    Parameters
    ----------
    y : (K, Z', Y', X') torch.Tensor, float32
    out, core : Box
    geometry : Geometry

    Returns
    -------
    (K, z, y, x) torch.Tensor, float32, the shape of ``core``
    """
    for axis, horizontal in ((2, True), (1, False), (0, False)):
        y = resample.resize_axis(
            y, axis + 1, geometry.scaled[axis], geometry.shape[axis], core[axis].start, core[axis].stop,
            out[axis].start, horizontal=horizontal,
        )
    return y


def _tile_weights(geometry: Geometry, view: ViewPlan, out: Box, device) -> tuple[torch.Tensor, list]:
    """The blending weights' sum over ``out`` in the view's plane, and per tile its cut."""
    a, b, c = view.axes
    tiles = geometry.view_tiles(view.view)
    bsb, bsc = tiles[b].bsize, tiles[c].bsize  # differ only for Cellpose 3's short planes
    wb = torch.from_numpy(taper(bsb).astype(np.float32)).to(device)
    wc = torch.from_numpy(taper(bsc).astype(np.float32)).to(device)
    ob, oc = out[b], out[c]
    wsum = torch.zeros((ob.stop - ob.start, oc.stop - oc.start), dtype=torch.float32, device=device)
    cuts = []
    for kb in view.tiles[0]:
        sb = tiles[b].starts[kb]
        lo_b, hi_b = max(sb, ob.start), min(sb + bsb, ob.stop)
        for kc in view.tiles[1]:
            sc = tiles[c].starts[kc]
            lo_c, hi_c = max(sc, oc.start), min(sc + bsc, oc.stop)
            tile = (slice(lo_b - sb, hi_b - sb), slice(lo_c - sc, hi_c - sc))
            dest = (slice(lo_b - ob.start, hi_b - ob.start), slice(lo_c - oc.start, hi_c - oc.start))
            mask = wb[tile[0], None] * wc[None, tile[1]]
            wsum[dest] += mask
            cuts.append((kb, kc, sb, sc, tile, dest, mask))
    return wsum, cuts


def _forward(net, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = net(x.to(dtype))
    if isinstance(y, (tuple, list)):  # Cellpose's networks also return a style vector
        y = y[0]
    return y.float()


def run_view(net, scaled: torch.Tensor, view: ViewPlan, out: Box, geometry: Geometry, *,
             batch_size: int = 8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Run ``net`` on the tiles of one view of a block and blend them over ``out``.

    Parameters
    ----------
    net : callable
        ``(B, C, bsize, bsize)`` -> ``(B, 3, bsize, bsize)`` (or a tuple whose first item is
        that), on the device of ``scaled``: flows along the tile's two axes and the
        cell-probability logit.
    scaled : (C, Z', Y', X') torch.Tensor, float32
        Network-scale input of ``view.region``.
    view : ViewPlan
    out : Box
        Network-scale samples to produce.
    geometry : Geometry
    batch_size : int
        Tiles per network call (tiles of several planes go together).
    dtype : torch.dtype
        Dtype the network runs in (its weights' dtype); outputs are float32.

    Returns
    -------
    (3, Z', Y', X') torch.Tensor, float32, the shape of ``out``
        The view's two flows (along its plane's first and second axis) and cellprob, in
        volume axis order.
    """
    a, b, c = view.axes
    dev = scaled.device
    bsb, bsc = geometry.view_tiles(view.view)[b].bsize, geometry.view_tiles(view.view)[c].bsize
    # planes first, then channels and the plane's two axes
    planes = scaled.permute(a + 1, 0, b + 1, c + 1)
    (cb0, cb1), (cc0, cc1) = view.canvas
    canvas = torch.zeros((planes.shape[0], planes.shape[1], cb1 - cb0, cc1 - cc0), dtype=torch.float32, device=dev)
    rb, rc = view.region[b], view.region[c]
    canvas[:, :, rb.start - cb0 : rb.stop - cb0, rc.start - cc0 : rc.stop - cc0] = planes
    del planes
    wsum, cuts = _tile_weights(geometry, view, out, dev)
    ob, oc = out[b], out[c]
    acc = torch.zeros((canvas.shape[0], 3, ob.stop - ob.start, oc.stop - oc.start), dtype=torch.float32, device=dev)
    jobs = [(p, cut) for p in range(canvas.shape[0]) for cut in cuts]
    for i in range(0, len(jobs), batch_size):
        batch = jobs[i : i + batch_size]
        x = torch.stack([
            _augment(canvas[p, :, sb - cb0 : sb - cb0 + bsb, sc - cc0 : sc - cc0 + bsc], kb, kc, geometry.augment)
            for p, (kb, kc, sb, sc, *_rest) in batch
        ])
        with torch.inference_mode():
            y = _forward(net, x, dtype)
        for j, (p, (kb, kc, _sb, _sc, tile, dest, mask)) in enumerate(batch):
            yj = _unaugment(y[j], kb, kc, geometry.augment)
            acc[p, :, dest[0], dest[1]] += yj[:, tile[0], tile[1]] * mask
    acc /= wsum
    # (plane, channel, b, c) -> (channel, Z, Y, X)
    order = [0, 0, 0]
    order[a], order[b], order[c] = 0, 2, 3
    return acc.permute(1, *order)


def _augment(tile: torch.Tensor, kb: int, kc: int, augment: bool) -> torch.Tensor:
    """Cellpose's test-time flips: by the parity of the tile's row (kb) and column (kc)."""
    if not augment:
        return tile
    dims = [d for d, flip in ((-2, kb % 2 == 0 and kc % 2 == 1), (-1, kb % 2 == 1 and kc % 2 == 0)) if flip]
    if kb % 2 == 1 and kc % 2 == 1:
        dims = [-2, -1]
    return tile.flip(dims) if dims else tile


def _unaugment(y: torch.Tensor, kb: int, kc: int, augment: bool) -> torch.Tensor:
    """Undo :func:`_augment` on a tile's output, negating the flows along flipped axes."""
    if not augment:
        return y
    flip_b = (kb % 2 == 0 and kc % 2 == 1) or (kb % 2 == 1 and kc % 2 == 1)
    flip_c = (kb % 2 == 1 and kc % 2 == 0) or (kb % 2 == 1 and kc % 2 == 1)
    dims = [d for d, f in ((-2, flip_b), (-1, flip_c)) if f]
    if not dims:
        return y
    y = y.flip(dims)
    sign = torch.ones(y.shape[0], 1, 1, dtype=y.dtype, device=y.device)
    if flip_b:
        sign[0] = -1
    if flip_c:
        sign[1] = -1
    return y * sign


def add_view(flows: torch.Tensor, view_out: torch.Tensor, view: str) -> None:
    """Add one view's output ``(3, ...)`` into the sum ``flows`` ``(4, ...)`` = dZ, dY, dX, cellprob."""
    _a, b, c = VIEW_AXES[view]
    flows[b] += view_out[0]
    flows[c] += view_out[1]
    flows[3] += view_out[2]


def view_inputs(plan: BlockPlan, read, lowhigh, *, pin: bool = False) -> list[torch.Tensor]:
    """Each view's normalised input for ``plan`` (host tensors, pinned when ``pin``).

    ``read(box) -> (C, z, y, x) ndarray`` gives the input voxels of a volume box.
    """
    inputs = []
    for view in plan.views:
        x = torch.from_numpy(normalize(read(view.read), lowhigh))
        inputs.append(x.pin_memory() if pin else x)
    return inputs


def run_block(net, plan: BlockPlan, inputs, geometry: Geometry, *, batch_size: int = 8,
              device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
              keep_views: bool = False, net_ortho=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The network part of :func:`predict_block`: every view of ``plan`` from its input
    (:func:`view_inputs`), summed and resized back to the core.

    ``dtype`` is the network's compute type (default: each network's own ``dtype`` attribute,
    else float32). Returns the core's flows ``(4, z, y, x)`` float32 and, with ``keep_views``,
    each view's own ``(3, z, y, x)`` output at the core's resolution (on ``device``).
    """
    flows = torch.zeros((4, *(s.stop - s.start for s in plan.out)), dtype=torch.float32, device=device)
    kept = []
    for view, x in zip(plan.views, inputs):
        scaled = to_network_scale(x.to(device, non_blocking=True), view.read, view.region, geometry)
        vnet = net if view.view == "YX" or net_ortho is None else net_ortho
        vdtype = dtype if dtype is not None and vnet is net else getattr(vnet, "dtype", dtype or torch.float32)
        y = run_view(vnet, scaled, view, plan.out, geometry, batch_size=batch_size, dtype=vdtype)
        del scaled
        add_view(flows, y, view.view)
        if keep_views:
            kept.append(from_network_scale(y, plan.out, plan.core, geometry))
        del y
    return from_network_scale(flows, plan.out, plan.core, geometry), kept


def predict_block(net, read, core: Box, geometry: Geometry, lowhigh, *, batch_size: int = 8,
                  device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                  keep_views: bool = False, net_ortho=None, views=VIEWS):
    """Cellpose's flows of the voxels ``core``, equal to a whole-volume run.

    The predict phase runs the same two steps (:func:`view_inputs` in its reader thread,
    :func:`run_block` on the device), so this is the code production runs.

    Parameters
    ----------
    net : callable
        The network (see :func:`run_view`), on ``device``.
    read : callable
        ``read(box) -> (C, z, y, x) ndarray``: the input voxels of a volume box.
    core : Box
    geometry : Geometry
    lowhigh : (C, 2) array-like
        Global normalisation values.
    batch_size, device, dtype
        See :func:`run_block`.
    keep_views : bool
        Also return each view's output at the core's resolution.
    net_ortho : callable, optional
        A second network for the ZY and ZX views (Cellpose 3's ``pretrained_model_ortho``);
        its tiles are ``geometry``'s ortho tiles (:meth:`Geometry.with_ortho`).
    views : the views to run and sum (all three; a 2D image: :data:`PLANE_VIEWS`)

    Returns
    -------
    flows : (4, z, y, x) ndarray of float32
        dZ, dY, dX, cellprob of ``core`` (Cellpose's 3D convention: views summed, network scale).
    views : (3, 3, z, y, x) ndarray of float32, or None
        Per view (YX, ZY, ZX): its two flows and its cellprob (``keep_views`` only).
    stats : dict
        ``planes`` and ``tiles`` run.
    """
    plan = plan_block(geometry, core, views)
    flows, kept = run_block(net, plan, view_inputs(plan, read, lowhigh), geometry, batch_size=batch_size,
                            device=device, dtype=dtype, keep_views=keep_views, net_ortho=net_ortho)
    views = np.stack([v.cpu().numpy() for v in kept]) if keep_views else None
    return flows.cpu().numpy(), views, {"planes": plan.planes, "tiles": plan.ntiles}


def predict_plane(net, read, core: tuple[slice, slice], geometry: Geometry, lowhigh, *, batch_size: int = 8,
                  device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """Cellpose's 2D flows of the pixels ``core`` of a ``(Y, X)`` image, equal to a whole-image run.

    ``geometry`` is :meth:`Geometry.plane`'s; ``read(box) -> (C, y, x)`` reads the image. The
    block plans only the tiles of the whole image's grid that cover the core, so any chunking
    gives the whole image's flows. Returns ``(flows, stats)``: flows ``(3, y, x)`` float32 =
    dY, dX, cellprob (Cellpose's 2D ``dP`` and cell probability, network scale), and the
    ``planes``/``tiles`` run.
    """
    if len(core) != 2 or geometry.shape[0] != 1:
        raise ValueError(f"core {core} must be (Y, X) slices of a plane geometry (shape {geometry.shape})")
    flows, _, stats = predict_block(net, lambda box: read(box[1:])[:, None], (slice(0, 1), *core), geometry, lowhigh,
                                    batch_size=batch_size, device=device, dtype=dtype, views=PLANE_VIEWS)
    return flows[1:, 0], stats
