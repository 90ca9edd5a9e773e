"""What a block (a chunk's core plus its halo) can know about the labels it holds.

Shared by the decisions made once per whole object in 2D (cell-nucleus matching, the flow
error). A block cannot see whether a label goes on beyond it - a label may even come in pieces
(a Cellpose mask is the pixels whose trajectories end at one seed, not always one connected
piece) - so the decisions take each label's bounding box in the whole slide, :class:`Boxes`,
which the pipeline gets from its per-cell statistics and a test from :func:`label_boxes`.

- A block face on the slide's edge is *closed* (nothing lies beyond it); a face inside the
  slide is *open*.
- A label is *whole* in a block when its box lies in the block and off the outermost row of
  every open face (there the block does not know a pixel's neighbours): then every pixel of it
  and its four neighbours are in the block (:func:`open_labels` lists the others).
- An object decided once is *owned* by the chunk whose core holds the first corner of its box
  (:func:`owned`): a point of the slide every block agrees on, so exactly one chunk owns it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Boxes", "label_boxes", "present_labels", "closed_faces", "check_block", "open_labels", "owned",
           "touching", "labels_on_faces"]


@dataclass(frozen=True)
class Boxes:
    """Bounding boxes of labels in the whole slide: ``ids`` (K,) ascending, half-open
    ``start``/``stop`` (K, ndim) in slide coordinates."""

    ids: np.ndarray
    start: np.ndarray
    stop: np.ndarray

    def rows(self, labels) -> np.ndarray:
        """The rows of ``labels``; ``ValueError`` for a label without a box."""
        labels = np.asarray(labels, np.uint64)
        rows = np.searchsorted(self.ids, labels)
        rows = np.minimum(rows, max(len(self.ids) - 1, 0))
        if len(labels) and (len(self.ids) == 0 or np.any(self.ids[rows] != labels)):
            missing = np.setdiff1d(labels, self.ids)
            raise ValueError(f"labels {missing[:5].tolist()} have no bounding box")
        return rows

    def extents(self) -> np.ndarray:
        """Per label, the sum of its box's sides (Cellpose's ``ext`` is that + 2 in 2D)."""
        return (self.stop - self.start).sum(axis=1)


def label_boxes(labels: np.ndarray, origin: Sequence[int] | None = None) -> Boxes:
    """The bounding box of every non-zero label of ``labels`` (placed at ``origin`` in the slide)."""
    labels = np.asarray(labels)
    origin = np.zeros(labels.ndim, np.int64) if origin is None else np.asarray(origin, np.int64)
    where = np.nonzero(labels)
    ids, inv = np.unique(labels[where], return_inverse=True)
    inv = inv.ravel()
    start = np.full((len(ids), labels.ndim), np.iinfo(np.int64).max, np.int64)
    stop = np.full((len(ids), labels.ndim), -1, np.int64)
    for ax, coord in enumerate(where):
        np.minimum.at(start[:, ax], inv, coord)
        np.maximum.at(stop[:, ax], inv, coord + 1)
    return Boxes(ids.astype(np.uint64), start + origin, stop + origin)


def present_labels(labels: np.ndarray) -> np.ndarray:
    """The non-zero labels of ``labels``, ascending (uint64): the unique values of its runs, which
    are ~10x fewer than its pixels."""
    flat = np.asarray(labels).ravel()
    if flat.size == 0:
        return np.zeros(0, np.uint64)
    u = np.unique(flat[np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])]).astype(np.uint64)
    return u[u != 0]


def check_block(origin: Sequence[int], shape: Sequence[int], slide_shape: Sequence[int]) -> None:
    """Raise ``ValueError`` unless the block lies in the slide."""
    if len(origin) != len(shape) or len(slide_shape) != len(shape) or any(
            int(o) < 0 or int(o) + int(n) > int(s) for o, n, s in zip(origin, shape, slide_shape)):
        raise ValueError(f"block at {tuple(origin)} of shape {tuple(shape)} does not lie in the slide "
                         f"{tuple(slide_shape)}")


def closed_faces(origin: Sequence[int], shape: Sequence[int],
                 slide_shape: Sequence[int]) -> tuple[tuple[bool, bool], ...]:
    """Per axis, whether the block's (first, last) face is the slide's edge."""
    return tuple((int(o) == 0, int(o) + int(n) == int(s)) for o, n, s in zip(origin, shape, slide_shape))


def open_labels(labels: np.ndarray, boxes: Boxes, *, origin, slide_shape) -> np.ndarray:
    """The labels present in the block (ascending, no 0) that are not whole in it."""
    labels = np.asarray(labels)
    present = present_labels(labels)
    closed = closed_faces(origin, labels.shape, slide_shape)
    lo = np.array([int(o) + (0 if first else 1) for o, (first, _) in zip(origin, closed)])
    hi = np.array([int(o) + int(n) - (0 if last else 1) for o, n, (_, last) in zip(origin, labels.shape, closed)])
    rows = boxes.rows(present)
    whole = np.all(boxes.start[rows] >= lo, axis=1) & np.all(boxes.stop[rows] <= hi, axis=1)
    return present[~whole]


def owned(ids, boxes: Boxes, *, origin, core: Sequence[slice]) -> np.ndarray:
    """The labels of ``ids`` whose box's first corner lies in ``core`` (block coordinates of a
    block at ``origin``)."""
    ids = np.asarray(ids, np.uint64)
    corner = boxes.start[boxes.rows(ids)] - np.asarray(origin, np.int64)
    inside = np.ones(len(ids), bool)
    for ax, sl in enumerate(core):
        inside &= (corner[:, ax] >= sl.start) & (corner[:, ax] < sl.stop)
    return ids[inside]


def touching(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(a, b)`` of different non-zero labels that are 4-neighbours (each pair once, a < b)."""
    labels = np.asarray(labels)
    a_all, b_all = [], []
    for ax in range(labels.ndim):
        lo = [slice(None)] * labels.ndim
        hi = [slice(None)] * labels.ndim
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        a, b = labels[tuple(lo)].ravel(), labels[tuple(hi)].ravel()
        diff = (a != b) & (a != 0) & (b != 0)
        a_all.append(a[diff])
        b_all.append(b[diff])
    a = np.concatenate(a_all).astype(np.uint64)
    b = np.concatenate(b_all).astype(np.uint64)
    lo_, hi_ = np.minimum(a, b), np.maximum(a, b)
    if len(lo_) == 0:
        return lo_, hi_
    pairs = np.unique(np.stack([lo_, hi_], axis=1), axis=0)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def labels_on_faces(labels: np.ndarray, core, shape) -> np.ndarray:
    """The labels of a core's voxels that lie on a face of the volume (Cellpose's
    ``remove_edge_masks``: the first or last index along an axis); axes of length 1 (a slide's
    one plane) have no faces, as in Cellpose's 2D."""
    found = []
    for ax, (s, n) in enumerate(zip(core, shape)):
        if n == 1:
            continue
        for at in {0, n - 1}:
            if s.start <= at < s.stop:
                found.append(np.take(labels, at - s.start, axis=ax).ravel())
    if not found:
        return np.zeros(0, np.int64)
    ids = np.unique(np.concatenate(found))
    return ids[ids != 0].astype(np.int64)
