"""Exact outlines of labelled cells: polygons along pixel edges, for GeoJSON (QuPath) output.

A cell's outline runs along the edges of its pixels, so the polygon's area is exactly the
cell's pixel count and a pixel centre lies inside it exactly when the pixel is the cell's
(nothing is smoothed or simplified away but collinear vertices). Coordinates are ``(x, y)`` in
pixels of the whole slide, y down, a pixel ``(y, x)`` covering ``[x, x + 1] x [y, y + 1]``
(QuPath's order); the first vertex is repeated last. Exterior rings run counter-clockwise as
seen on the image (the cell on the left), holes clockwise.

Pixels that touch only at a corner belong to separate rings (the cell is then a MultiPolygon,
as 4-connectivity has it): at a vertex where a boundary could go on two ways, the trace turns
towards the cell. A cell's outline depends on its pixels alone, so the chunk that owns a whole
cell writes it once.
"""

from __future__ import annotations

import numpy as np

__all__ = ["mask_rings", "cell_geometry", "cell_feature", "ring_area"]

# Directions of travel along pixel edges, in (dx, dy) with y growing down the image.
_E, _S, _W, _N = (1, 0), (0, 1), (-1, 0), (0, -1)


def mask_rings(mask: np.ndarray, origin=(0, 0)) -> list[list[tuple[int, int]]]:
    """The closed rings of pixel edges bounding ``mask`` (2D bool), in slide coordinates
    (``origin``: the slide index of ``mask[0, 0]``, as ``(y, x)``).

    Each ring is a list of ``(x, y)`` vertices with the first repeated last, collinear vertices
    removed, the mask on the left of the direction of travel (image frame, y down).
    """
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D, got shape {mask.shape}")
    pad = np.pad(mask, 1)
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(a, b):
        edges.setdefault(a, []).append(b)

    inner = pad[1:-1, 1:-1]
    sides = (  # (pixels with that side on the boundary, edge start, edge end) as (x, y) offsets
        (inner & ~pad[:-2, 1:-1], (1, 0), (0, 0)),  # top side, travelling west
        (inner & ~pad[1:-1, :-2], (0, 0), (0, 1)),  # left side, south
        (inner & ~pad[2:, 1:-1], (0, 1), (1, 1)),  # bottom side, east
        (inner & ~pad[1:-1, 2:], (1, 1), (1, 0)),  # right side, north
    )
    for on, (ax, ay), (bx, by) in sides:  # vertices (x, y) in padded coordinates
        ys, xs = np.nonzero(on)
        for y, x in zip((ys + 1).tolist(), (xs + 1).tolist()):
            add((x + ax, y + ay), (x + bx, y + by))
    oy, ox = int(origin[0]) - 1, int(origin[1]) - 1  # undo the padding, add the origin
    rings = []
    while edges:
        start = next(iter(edges))
        first = _take(edges, start, edges[start][0])
        ring, here, came = [start, first], first, _dir(start, first)
        while True:
            if here == start and (start not in edges or _left(came) == _dir(start, first)):
                break
            outs = edges[here]
            nxt = outs[0] if len(outs) == 1 else next(o for o in outs if _dir(here, o) == _left(came))
            _take(edges, here, nxt)
            came, here = _dir(here, nxt), nxt
            ring.append(here)
        rings.append(_collinear_free([(vx + ox, vy + oy) for vx, vy in ring]))
    return rings


def _take(edges, a, b):
    """Remove the edge a -> b and return b."""
    edges[a].remove(b)
    if not edges[a]:
        del edges[a]
    return b


def _dir(a, b) -> tuple[int, int]:
    return (b[0] - a[0], b[1] - a[1])


def _left(d) -> tuple[int, int]:
    """The direction to the left of ``d`` as seen on the image (y down): east -> north."""
    return {_E: _N, _N: _W, _W: _S, _S: _E}[d]


def _collinear_free(ring):
    """Drop vertices in the middle of straight runs; keep the ring closed."""
    pts = ring[:-1]
    n = len(pts)
    keep = []
    for i in range(n):
        a, b, c = pts[i - 1], pts[i], pts[(i + 1) % n]
        if (b[0] - a[0]) * (c[1] - b[1]) - (b[1] - a[1]) * (c[0] - b[0]) != 0:
            keep.append(b)
    return keep + keep[:1]


def ring_area(ring) -> float:
    """Area of a ring, positive for exterior rings (the cell on the left, as on the image) and
    negative for holes."""
    a = np.asarray(ring, np.float64)
    return -0.5 * float(np.sum(a[:-1, 0] * a[1:, 1] - a[1:, 0] * a[:-1, 1]))


def cell_geometry(mask: np.ndarray, origin=(0, 0)) -> dict:
    """A GeoJSON geometry (``Polygon`` or ``MultiPolygon``) of the pixels of ``mask``.

    Exterior rings have positive :func:`ring_area`, holes negative; each hole goes with the
    exterior ring that contains it. An empty mask gives ``None``.
    """
    rings = mask_rings(mask, origin)
    if not rings:
        return None
    outer = [r for r in rings if ring_area(r) > 0]
    holes = [r for r in rings if ring_area(r) < 0]
    polys = [[r] for r in outer]
    for h in holes:
        (x0, y0), (x1, y1) = h[0], h[1]  # a point in the hole: off the first edge's middle, to its right
        x, y = (x0 + x1) / 2 - 0.25 * (y1 - y0) / max(abs(y1 - y0), 1), (y0 + y1) / 2 + 0.25 * (x1 - x0) / max(abs(x1 - x0), 1)
        for poly in polys:
            if _inside(poly[0], x, y):
                poly.append(h)
                break
    coords = [[[list(v) for v in ring] for ring in poly] for poly in polys]
    if len(coords) == 1:
        return {"type": "Polygon", "coordinates": coords[0]}
    return {"type": "MultiPolygon", "coordinates": coords}


def _inside(ring, x, y) -> bool:
    """Even-odd test of the point (x, y) against a ring."""
    inside = False
    for (x1, y1), (x2, y2) in zip(ring[:-1], ring[1:]):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def cell_feature(label: int, cell: np.ndarray, nucleus: np.ndarray | None = None, *, origin=(0, 0),
                 measurements: dict | None = None) -> dict:
    """One cell as a GeoJSON Feature in QuPath's layout: ``geometry`` (the whole cell),
    ``nucleusGeometry`` (when the cell has a nucleus), ``properties.objectType = "cell"``, the
    label as ``properties.name`` and ``measurements`` (name: number)."""
    props = {"objectType": "cell", "name": str(int(label))}
    if measurements:
        props["measurements"] = {str(k): float(v) for k, v in measurements.items()}
    feature = {"type": "Feature", "id": str(int(label)), "geometry": cell_geometry(cell, origin), "properties": props}
    if nucleus is not None and np.any(nucleus):
        feature["nucleusGeometry"] = cell_geometry(nucleus, origin)
    return feature
