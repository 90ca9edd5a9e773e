"""The QC report ``qc/report.html`` with its PNGs, readable offline (no script, font or image
from the network).

The pictures are assembled from small per-chunk pieces, so no task holds more than a chunk
and a picture:

- ``finalize:labels`` (per chunk, :func:`write_chunk_views`): on a fixed grid of sampled
  voxels (every ``stride``-th voxel along each axis, at most :data:`MAX_VIEW` per side), the
  core's share of the three orthogonal slices through the volume's centre and of the three
  maximum-intensity projections of the first input channel, with the label at the projected
  voxel (the first maximum along the projection axis), into ``work/qc/c<chunk>.npz``;
- ``finalize:report`` (:func:`write_report`): pastes the pieces (projections keep the larger
  value, ties the smaller coordinate: the whole-volume ``argmax``), draws label outlines over
  the intensities scaled by the run's global percentiles, plots the cell-size distribution
  and the cells and seconds per chunk, and writes the page.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math

import numpy as np

from zseg.outputs.labels import voxel_size_um
from zseg.storage import uri as U
from zseg.workspace import usage
from zseg.workspace import work as W
from zseg.workspace.context import RunContext

log = logging.getLogger(__name__)
QC_DIR = "qc"
#: Longest side of a slice or projection, in sampled voxels.
MAX_VIEW = 512
#: Longest side of a picture on the page, in pixels.
DISPLAY = 380
AXES = "zyx"


def view_plan(shape) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(stride, sampled shape, centre)`` of the QC views of a volume of ``shape``."""
    stride = tuple(max(1, math.ceil(n / MAX_VIEW)) for n in shape)
    sampled = tuple(math.ceil(n / s) for n, s in zip(shape, stride))
    centre = tuple(n // 2 for n in shape)
    return stride, sampled, centre


def write_chunk_views(run: RunContext, index: int, core_labels: np.ndarray, image: np.ndarray) -> None:
    """This core's pieces of the slices and projections (first channel), see the module doc."""
    g = run.grid
    core = g.core(index)
    stride, _, centre = view_plan(g.shape)
    first = [(-s.start) % k for s, k in zip(core, stride)]
    picks = [np.arange(f, s.stop - s.start, k) for f, s, k in zip(first, core, stride)]
    at = [(s.start + f) // k for s, f, k in zip(core, first, stride)]
    img = image[0]
    out: dict[str, np.ndarray] = {}
    for a in range(3):
        other = [b for b in range(3) if b != a]
        if any(len(picks[b]) == 0 for b in other):
            continue
        sel = [np.arange(n) for n in img.shape]
        for b in other:
            sel[b] = picks[b]
        sub, lab = img[np.ix_(*sel)], core_labels[np.ix_(*sel)]
        arg = sub.argmax(axis=a)
        out[f"mip{a}_val"] = sub.max(axis=a).astype(np.float32)
        out[f"mip{a}_arg"] = (arg + core[a].start).astype(np.int64)
        out[f"mip{a}_lab"] = np.take_along_axis(lab, np.expand_dims(arg, a), axis=a).squeeze(a)
        out[f"at{a}"] = np.array([at[b] for b in other], np.int64)
        if core[a].start <= centre[a] < core[a].stop:
            out[f"slice{a}_val"] = np.take(sub, centre[a] - core[a].start, axis=a).astype(np.float32)
            out[f"slice{a}_lab"] = np.take(lab, centre[a] - core[a].start, axis=a)
    U.write_npz(run.chunk_file(QC_DIR, index), **out)


def assemble_views(run: RunContext) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The six pictures as ``name -> (intensity, labels)`` over the sampled grid."""
    g = run.grid
    _, sampled, _ = view_plan(g.shape)
    views = {}
    for a in range(3):
        hw = tuple(sampled[b] for b in range(3) if b != a)
        views[f"mip{a}"] = [np.full(hw, -np.inf, np.float32), np.zeros(hw, np.uint64),
                            np.full(hw, np.iinfo(np.int64).max, np.int64)]
        views[f"slice{a}"] = [np.zeros(hw, np.float32), np.zeros(hw, np.uint64)]
    for i in range(g.nchunks):
        d = U.read_npz(run.chunk_file(QC_DIR, i))
        for a in range(3):
            if f"at{a}" not in d:
                continue
            y0, x0 = (int(v) for v in d[f"at{a}"])
            h, w = d[f"mip{a}_val"].shape
            box = (slice(y0, y0 + h), slice(x0, x0 + w))
            val, lab, arg = (v[box] for v in views[f"mip{a}"])
            nv, na = d[f"mip{a}_val"], d[f"mip{a}_arg"]
            better = (nv > val) | ((nv == val) & (na < arg))
            val[better], lab[better], arg[better] = nv[better], d[f"mip{a}_lab"][better], na[better]
            if f"slice{a}_val" in d:
                views[f"slice{a}"][0][box] = d[f"slice{a}_val"]
                views[f"slice{a}"][1][box] = d[f"slice{a}_lab"]
    return {k: (v[0], v[1]) for k, v in views.items()}


# -- pictures ------------------------------------------------------------------------------------
def label_colors(labels: np.ndarray) -> np.ndarray:
    """A bright colour per label (golden-ratio hues), ``labels.shape + (3,)`` uint8."""
    h = (labels.astype(np.float64) * 0.618033988749895) % 1.0
    s, v = 0.85, 1.0
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = np.zeros(labels.shape + (3,), np.float64)
    for k, (r, gg, b) in enumerate(table):
        m = i == k
        for c, val in enumerate((r, gg, b)):
            rgb[..., c][m] = val if np.isscalar(val) else val[m]
    return (rgb * 255).round().astype(np.uint8)


def outlines(labels: np.ndarray) -> np.ndarray:
    """Voxels of a label that touch another value (4-neighbourhood), as a boolean mask."""
    edge = np.zeros(labels.shape, bool)
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return edge & (labels != 0)


def render(values: np.ndarray, labels: np.ndarray, pixel: tuple[float, float], low: float, high: float) -> np.ndarray:
    """An RGB picture: intensities scaled to ``[low, high]`` in grey, label outlines in colour,
    resized (nearest) to physical proportions with the longer side :data:`DISPLAY` pixels."""
    h, w = values.shape
    ph, pw = h * pixel[0], w * pixel[1]
    k = DISPLAY / max(ph, pw)
    H, W = max(1, round(ph * k)), max(1, round(pw * k))
    rows = np.minimum((np.arange(H) * h) // H, h - 1)
    cols = np.minimum((np.arange(W) * w) // W, w - 1)
    v = values[np.ix_(rows, cols)].astype(np.float64)
    lab = labels[np.ix_(rows, cols)]
    v = np.where(np.isfinite(v), v, low)
    grey = np.clip((v - low) / max(high - low, 1e-12), 0, 1)
    rgb = np.repeat((grey * 255).round().astype(np.uint8)[..., None], 3, axis=2)
    edge = outlines(lab)
    rgb[edge] = label_colors(lab[edge])
    return rgb


def png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def size_histogram(volumes: np.ndarray, voxel_um3: float, xlabel: str = "cell volume (µm³)",
                   what: str = "cells") -> bytes | None:
    """PNG of the distribution of cell volumes (µm³; or areas), from exact counts per voxel volume."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = np.flatnonzero(volumes)
    if not len(sizes):
        return None
    lo, hi = sizes[0] * voxel_um3, sizes[-1] * voxel_um3
    log_scale = hi / max(lo, 1e-12) > 20
    bins = np.geomspace(lo, hi * 1.0001, 41) if log_scale else np.linspace(lo, hi + 1e-9 * max(hi, 1), 41)
    hist, edges = np.histogram(sizes * voxel_um3, bins=bins, weights=volumes[sizes])
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.stairs(hist, edges, fill=True, color="#4c72b0")
    if log_scale:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(what)
    ax.set_title(f"{int(volumes.sum())} {what}")
    ax.grid(alpha=0.3)
    return figure_png(fig)


def chunk_maps(cells: np.ndarray, seconds: np.ndarray) -> bytes:
    """PNG of cells and task seconds per chunk, summed over the grid's Z layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nz = cells.shape[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, data, title, cmap in ((axes[0], cells.sum(axis=0), "cells (owned) per chunk", "viridis"),
                                  (axes[1], seconds.sum(axis=0), "task seconds per chunk", "magma")):
        im = ax.imshow(data, cmap=cmap, interpolation="nearest", origin="upper")
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_title(title + (f" (sum over {nz} z layers)" if nz > 1 else ""), fontsize=10)
        ax.set_xlabel("chunk x")
        ax.set_ylabel("chunk y")
        if data.shape[1] <= 32:
            ax.set_xticks(range(data.shape[1]))
        if data.shape[0] <= 32:
            ax.set_yticks(range(data.shape[0]))
        if data.size <= 144:
            mid = (float(data.min()) + float(data.max())) / 2
            for (y, x), v in np.ndenumerate(data):
                ax.text(x, y, f"{v:.0f}" if data.dtype.kind in "iu" else f"{v:.1f}", ha="center", va="center",
                        color="black" if v > mid else "white", fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


# -- the page ------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1320px;color:#222;
background:#fafafa;padding:0 16px}
h1{margin-bottom:4px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
.sub{color:#666;margin-top:0}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:8px}figcaption{font-size:13px;color:#555;margin-top:4px}
figure img{display:block;max-width:100%;image-rendering:pixelated}
.ok{background:#e6f4ea;border:1px solid #8bc79b;padding:8px 12px}
.warn{background:#fff4e5;border:1px solid #f0b35b;padding:8px 12px}
pre{background:#fff;border:1px solid #ddd;padding:8px;overflow:auto;font-size:12px}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute('data-images-loaded', ok.length + '/' + imgs.length);
});
"""


def escape(v) -> str:
    return html.escape(str(v))


def html_table(rows, header=None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for v in row:
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{escape(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def html_figure(src: str, caption: str, alt: str) -> str:
    return f'<figure><img src="{escape(src)}" alt="{escape(alt)}"><figcaption>{escape(caption)}</figcaption></figure>'


def write_report(run: RunContext, report: dict, lay, *, volumes: np.ndarray | None = None,
                 chunk_cells: np.ndarray | None = None, chunk_seconds: np.ndarray | None = None) -> str:
    """Write ``qc/report.html`` and its PNGs; returns the page's URI.

    Parameters
    ----------
    report : dict
        The run's result (counts, ``table`` summary, ``usage``).
    lay : zseg.outputs.labels.Layout
        The datasets of ``labels.zarr``.
    volumes : (V,) ndarray of int, optional
        Number of cells of each volume in voxels (index = volume).
    chunk_cells, chunk_seconds : (nchunks,) ndarray, optional
        Cells owned and seconds of all map tasks, per chunk.
    """
    g = run.grid
    qc_dir = U.join(run.params.output, QC_DIR)
    stride, sampled, centre = view_plan(g.shape)
    vs = voxel_size_um(run)
    try:
        low, high = (float(v) for v in W.lowhigh(run)[0])
    except Exception:  # no percentiles (an older run): the pictures' own range
        low, high = None, None
    views = assemble_views(run)
    if low is None:
        finite = np.concatenate([v[np.isfinite(v)].ravel() for v, _ in views.values()])
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)

    figures = {"slices": [], "mips": []}
    names = {0: ("XY", "z"), 1: ("XZ", "y"), 2: ("YZ", "x")}
    for a in range(3):
        other = [b for b in range(3) if b != a]
        pixel = tuple(stride[b] * vs[b] for b in other)
        plane, along = names[a]
        for kind, key in (("slice", "slices"), ("mip", "mips")):
            val, lab = views[f"{kind}{a}"]
            fname = f"{kind}_{plane.lower()}.png"
            U.write_bytes(U.join(qc_dir, fname), png(render(val, lab, pixel, low, high)))
            if kind == "slice":
                cap = f"{plane} slice at {along} = {centre[a]}"
            else:
                cap = f"{plane} maximum projection along {along}"
            cap += f"; {len(np.unique(lab[lab != 0]))} cells outlined"
            if stride[other[0]] > 1 or stride[other[1]] > 1:
                cap += f"; sampled every {stride[other[0]]}×{stride[other[1]]} voxels"
            figures[key].append(html_figure(fname, cap, f"{plane} {kind}"))

    voxel_um3 = float(np.prod(vs))
    size_png = size_histogram(volumes, voxel_um3) if volumes is not None else None
    if size_png:
        U.write_bytes(U.join(qc_dir, "sizes.png"), size_png)
    if chunk_cells is None or chunk_seconds is None:
        _, chunk_seconds, chunk_cells = usage.scan(run)
    U.write_bytes(U.join(qc_dir, "chunks.png"),
                  chunk_maps(np.asarray(chunk_cells).reshape(g.grid_shape), np.asarray(chunk_seconds).reshape(g.grid_shape)))

    info = run.manifest.get("input") or {}
    table = report.get("table") or {}
    summary_rows = [
        ("input", info.get("uri", run.params.input)),
        ("format", info.get("format", "")),
        ("shape (z, y, x)", " × ".join(map(str, g.shape))),
        ("dtype", info.get("dtype", "")),
        ("channels", ", ".join(str(n if n is not None else c)
                               for c, n in zip(info.get("channels") or [], info.get("channel_names") or []))),
        ("voxel size (µm)", " × ".join(f"{v:g}" for v in vs)),
        ("chunk grid", f"{' × '.join(map(str, g.grid_shape))} chunks of {' × '.join(map(str, g.chunk_shape))}, "
                       f"halo {' × '.join(map(str, g.halo))}"),
        ("cells", report.get("cells", table.get("rows", ""))),
        ("labelled voxels", table.get("labelled_voxels", "")),
        ("median cell volume (voxels)", table.get("volume_voxels_median", "")),
        ("labels", "labels.zarr: " + ", ".join(f"{lv.path} {lv.role} {'×'.join(map(str, lv.shape))}"
                                              for lv in lay.levels)),
    ]
    if report.get("chunk_exact", True):
        verdict = '<p class="ok">Chunk-exact: no trajectory or cell was cut by a block face.</p>'
    else:
        verdict = (f'<p class="warn">Not chunk-exact: {escape(report.get("long_trajectories"))} long trajectories, '
                   f'{escape(report.get("cells_cut_by_block"))} cells cut by a block face. Re-run with halo '
                   f'{escape(report.get("suggested_halo"))}.</p>')
    stage_usage = report.get("usage") or {}
    usage_rows = [(name, u.get("kind", ""), u.get("tasks", ""), u.get("seconds", ""),
                   u.get("longest_task_seconds", ""), u.get("peak_rss_mib", "")) for name, u in stage_usage.items()]
    phase_rows = [(p, u["tasks"], u["seconds"], u["peak_rss_mib"]) for p, u in usage.by_phase(stage_usage).items()]
    versions = run.manifest.get("versions") or {}
    params = [(k, json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else v))
              for k, v in (run.manifest.get("params") or {}).items()]

    page = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>zseg QC: {escape(run.params.output)}</title>", f"<style>{CSS}</style></head>",
        '<body data-images-loaded="pending">',
        "<h1>zseg segmentation report</h1>",
        f'<p class="sub">{escape(run.params.output)} · created {escape(run.manifest.get("created", ""))} · '
        f'zseg {escape(versions.get("zseg", ""))}</p>',
        verdict,
        "<h2>Summary</h2>", html_table(summary_rows),
        "<h2>Orthogonal slices through the centre</h2>",
        '<p class="sub">First channel, scaled between the run\'s global percentiles '
        f"({escape(f'{low:g}')} – {escape(f'{high:g}')}); each cell outlined in its own colour; physical proportions.</p>",
        '<div class="row">' + "".join(figures["slices"]) + "</div>",
        "<h2>Maximum projections</h2>",
        '<p class="sub">Outlines of the cell at the brightest voxel along the projection.</p>',
        '<div class="row">' + "".join(figures["mips"]) + "</div>",
        "<h2>Cell sizes</h2>",
        '<div class="row">' + (html_figure("sizes.png", "distribution of cell volumes", "cell sizes") if size_png
                               else "<p>No cells.</p>") + html_table(
            [(k, round(v, 3) if isinstance(v, float) else v) for k, v in table.items()], ("statistic", "value")) + "</div>",
        "<h2>Chunks</h2>",
        '<div class="row">' + html_figure("chunks.png", "cells owned (seed in the chunk) and seconds of all map tasks, "
                                      "per chunk", "chunk map") + "</div>",
        "<h2>Time and memory</h2>",
        html_table(phase_rows, ("phase", "tasks", "seconds (sum)", "peak memory (MiB, largest task)")),
        "<p></p>",
        html_table(usage_rows, ("stage", "kind", "tasks", "seconds (sum)", "longest task (s)", "peak memory (MiB)")),
        "<h2>Parameters</h2>", html_table(params, ("parameter", "value")),
        "<h2>Versions</h2>", html_table(sorted(versions.items()), ("package", "version")),
        f"<script>{SCRIPT}</script>",
        "</body></html>",
    ]
    uri = U.join(qc_dir, "report.html")
    U.write_bytes(uri, "\n".join(page).encode())
    log.info("QC report: %s", uri)
    return uri
