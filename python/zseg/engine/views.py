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

How a piece of the volume reproduces it
---------------------------------------
Every step above is a function of *global* coordinates only: the resize of step 2 and 5
places an output sample at a position fixed by the whole axis's lengths
(:mod:`zseg.engine.resample`), and the tiles of step 3 are fixed by the whole plane's size
(:mod:`zseg.engine.tiles`). So a piece never pads, tiles or resizes itself: it resizes the input
it reads to the network-scale samples it needs (:func:`to_network_scale`), cuts the tiles of the
*whole-plane* grid from them (outside the volume, the network sees the zero padding Cellpose
adds) and resizes network-scale sums back to the voxels it writes (:func:`from_network_scale`).
Which piece runs which tile, and how overlapping tiles are summed exactly, is
:mod:`zseg.engine.units`: each tile runs once, whatever the chunking.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from zseg.engine import resample
from zseg.engine.tiles import AxisTiles

__all__ = [
    "VIEWS",
    "PLANE_VIEWS",
    "VIEW_AXES",
    "Geometry",
    "scaled_shape",
    "to_network_scale",
    "from_network_scale",
    "augment_tile",
    "unaugment_tile",
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
        return cls.planes((1, *shape), diameter=diameter, bsize=bsize, tile_overlap=tile_overlap, augment=augment,
                          diam_mean=diam_mean, pad_to_tile=pad_to_tile)

    @classmethod
    def planes(cls, shape, *, diameter: float = 30.0, bsize: int = 256, tile_overlap: float = 0.1,
               augment: bool = False, diam_mean: float = 30.0, pad_to_tile: bool = True) -> "Geometry":
        """Cellpose's 2D ``eval`` of every plane of a ``(Z, Y, X)`` stack (``do_3D=False``, the
        network pass of stitch mode): each plane resized by ``diam_mean / diameter`` in Y and X
        only and tiled as a whole plane (:data:`PLANE_VIEWS`); Z is not resized."""
        lz, ly, lx = (int(s) for s in shape)
        rescale = float(diam_mean) / diameter
        scaled = (lz, ly, lx) if rescale == 1.0 else (lz, int(ly * rescale), int(lx * rescale))
        if min(scaled) < 1:
            raise ValueError(f"diameter {diameter} shrinks the image {(ly, lx)} to {scaled[1:]}")
        tiles = tuple(AxisTiles.of(n, bsize, tile_overlap=tile_overlap, augment=augment, pad_to_tile=pad_to_tile)
                      for n in scaled)
        return cls((lz, ly, lx), scaled, tiles, augment)

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

    def view_counts(self, views=VIEWS) -> dict[str, tuple[int, int]]:
        """Per view, ``(planes, tiles)`` of Cellpose's whole-volume run."""
        out = {}
        for v in views:
            a, b, c = VIEW_AXES[v]
            t = self.view_tiles(v)
            out[v] = (self.scaled[a], self.scaled[a] * len(t[b]) * len(t[c]))
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


def augment_tile(tile: torch.Tensor, kb: int, kc: int, augment: bool) -> torch.Tensor:
    """Cellpose's test-time flips: by the parity of the tile's row (kb) and column (kc)."""
    if not augment:
        return tile
    dims = [d for d, flip in ((-2, kb % 2 == 0 and kc % 2 == 1), (-1, kb % 2 == 1 and kc % 2 == 0)) if flip]
    if kb % 2 == 1 and kc % 2 == 1:
        dims = [-2, -1]
    return tile.flip(dims) if dims else tile


def unaugment_tile(y: torch.Tensor, kb: int, kc: int, augment: bool) -> torch.Tensor:
    """Undo :func:`augment_tile` on a tile's output, negating the flows along flipped axes."""
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
