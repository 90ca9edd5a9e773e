"""What a block (a chunk's core plus its halo) can know about the labels it holds.

Shared by the decisions made once per whole object in 2D (cell-nucleus matching, the flow
error): a block face on the slide's edge is *closed* (nothing lies beyond it); a face inside the
slide is *open*, and a label with a pixel on an open face may go on beyond the block. An object
is decided by the one chunk that *owns* it: the chunk whose core holds the object's first pixel
in C order, which every block that holds the whole object agrees on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["closed_faces", "check_block", "on_open_faces", "first_pixels", "owned", "touching"]


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


def on_open_faces(labels: np.ndarray, closed) -> np.ndarray:
    """The labels (ascending, no 0) with a pixel on an open face of the block."""
    rows = []
    for ax, (first, last) in enumerate(closed):
        moved = np.moveaxis(labels, ax, 0)
        if not first:
            rows.append(moved[0].ravel())
        if not last:
            rows.append(moved[-1].ravel())
    if not rows:
        return np.zeros(0, np.uint64)
    u = np.unique(np.concatenate(rows)).astype(np.uint64)
    return u[u != 0]


def first_pixels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, index)``: each label (ascending, no 0) and the flat index of its first pixel in C order."""
    flat = np.asarray(labels).ravel()
    runs = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])  # a label's first pixel starts a run
    ids, first_run = np.unique(flat[runs], return_index=True)
    first = runs[first_run]
    keep = ids != 0
    return ids[keep].astype(np.uint64), first[keep]


def owned(labels: np.ndarray, core: Sequence[slice]) -> np.ndarray:
    """The labels whose first pixel (C order) lies in ``core`` (block coordinates)."""
    ids, first = first_pixels(labels)
    pos = np.unravel_index(first, labels.shape)
    inside = np.ones(len(ids), bool)
    for p, sl in zip(pos, core):
        inside &= (p >= sl.start) & (p < sl.stop)
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
