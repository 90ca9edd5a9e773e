"""The run context: the manifest ``OUTPUT/run.json`` and the handle every phase works through.

A run folder holds ``run.json`` (written once by ``plan``) and the phases' outputs. Each
per-chunk result file is written atomically and *last*, after the chunk's array data, so its
presence is the chunk's completion marker: ``zseg run`` and Nextflow ``-resume`` skip chunks
whose marker exists, and a killed task leaves no marker behind.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import math
import platform

from pydantic import ValidationError

from zseg import __version__
from zseg.errors import UserError
from zseg.params import RunParams
from zseg.storage import fingerprint as FP
from zseg.storage import uri as U
from zseg.storage.grid import ChunkGrid
from zseg.storage.volume import open_volume
from zseg.workspace.work import FINGERPRINT_DIR

MANIFEST = "run.json"


def versions() -> dict[str, str]:
    """Versions of the packages whose behaviour decides the result."""
    out = {"zseg": __version__, "python": platform.python_version()}
    for pkg in ("cellpose", "torch", "numpy", "scipy", "numba", "zarr", "tifffile", "fsspec"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


#: What a message about a damaged ``run.json`` tells the user to do.
ADVICE = "restore it, or start the run again with --overwrite"


def read_manifest(root: str) -> dict | None:
    """``root``'s ``run.json`` as read, None when there is none; a file that is not JSON (truncated,
    or edited by hand) is refused. The contexts check what it holds."""
    path = U.join(root, MANIFEST)
    if not U.exists(path):
        return None
    try:
        return U.read_json(path)
    except Exception as e:
        reason = " ".join(str(e).split())
        raise UserError(f"{path!r} is not valid JSON ({reason}): it was truncated or edited; {ADVICE}.") from None


class WorkLayout:
    """Where a run keeps its files: the work folder (``params.work`` or ``OUTPUT/work``), per-chunk
    files ``work/<phase>/cNNNNNNN.<ext>`` and which of them are missing. Shared by the contexts of
    volume runs (:class:`RunContext`) and slide runs (``zseg.workspace.slide.SlideContext``), both
    made from a folder and its manifest."""

    def __init__(self, root: str, manifest: dict):
        self.root = str(root)
        self.manifest = manifest
        self.params = RunParams.model_validate(manifest["params"])
        # Outputs go where run.json was found, whatever the manifest says (a moved or edited
        # manifest cannot send writes elsewhere); only the user's own --work may lie outside.
        self.params.output = self.root
        g = manifest["grid"]
        self.grid = ChunkGrid(tuple(g["shape"]), tuple(g["chunk_shape"]), tuple(g["halo"]))
        #: the grid of the input's voxels, whichever grid the context works on (:class:`NetworkScale`)
        self.volume_grid = self.grid

    def described_changes(self, described: dict) -> list[str]:
        """The keys of the input's description (:meth:`Volume.describe`, as opened now) that
        differ from the one planned with."""
        was = self.manifest.get("input") or {}
        return sorted(k for k in described if k in was and was[k] != described[k])

    def refuse_described_changes(self, described: dict) -> None:
        """Refuse, with one line, an input whose description (as opened now) is not the planned one."""
        was, changed = self.manifest.get("input") or {}, self.described_changes(described)
        if changed:
            raise UserError(f"input {self.params.input!r} changed since this run was planned ({', '.join(changed)}: "
                            f"{', '.join(f'{was[k]} -> {described[k]}' for k in changed[:2])}); {FP.Reads.ADVICE}")

    def reads(self, name: str):
        """The check of store ``name`` (input, flows, mask, model) against its fingerprint (one
        per context, so each object is checked once per process), or None for a run planned
        without one."""
        cache = self.__dict__.setdefault("_reads", {})
        if name not in cache:
            rec = (self.manifest.get("fingerprint") or {}).get(name)
            cache[name] = None if rec is None else FP.Reads(name, rec, self.fingerprint_table(name, rec))
        return cache[name]

    def fingerprint_table(self, name: str, rec: dict) -> str | None:
        """Where the object table of store ``name``'s fingerprint ``rec`` lives (zarr stores only)."""
        return self.path(FINGERPRINT_DIR, f"{name}.zarr") if rec["kind"] == "zarr" else None

    def input_changes(self, described: dict | None = None) -> list[str]:
        """What changed in the stores this run reads since it was planned (each listed again);
        ``described``: the input as opened now (:meth:`Volume.describe`), to compare too."""
        problems = []
        changed = self.described_changes(described) if described is not None else []
        if changed:
            problems.append(f"input {self.params.input!r} changed ({', '.join(changed)})")
        for name, rec in (self.manifest.get("fingerprint") or {}).items():
            problems += FP.changes(name, rec, self.fingerprint_table(name, rec))
        return problems

    @property
    def work(self) -> str:
        return self.params.work_uri()

    def path(self, *parts: str) -> str:
        """A file or folder under the work folder."""
        return U.join(self.work, *parts)

    def chunk_file(self, phase: str, index: int, ext: str = "npz") -> str:
        return self.path(phase, f"c{index:07d}.{ext}")

    def done(self, phase: str, index: int, ext: str = "npz") -> bool:
        return U.exists(self.chunk_file(phase, index, ext))

    def pending(self, phase: str, chunks, ext: str = "npz") -> list[int]:
        """The chunks of ``chunks`` whose ``phase`` marker is missing (one listing, not one stat each)."""
        present = set(U.listdir(self.path(phase)))
        return [i for i in chunks if f"c{i:07d}.{ext}" not in present]


class RunContext(WorkLayout):
    """A planned run as every phase sees it: its parameters, input, chunk grid and file layout
    (read from ``run.json``; the one handle a task works through)."""

    @classmethod
    def open(cls, root: str) -> "RunContext":
        path = U.join(root, MANIFEST)
        manifest = read_manifest(root)
        if manifest is None:
            raise UserError(
                f"{root!r} is not a planned zseg run (no {MANIFEST}); run `zseg plan INPUT {root}` first."
            )
        problems = check_manifest(manifest)
        if problems:
            raise UserError(*(f"{path!r} was edited or damaged: {p}; {ADVICE}." for p in problems))
        return cls(root, manifest)

    # -- inputs ------------------------------------------------------------------------------
    @functools.cached_property
    def volume(self):
        """The input, each box read checked against the run's fingerprint of it."""
        p = self.params
        vol = open_volume(
            p.input, axes=p.axes, level=p.level, channels=p.channels, timepoint=p.timepoint,
            channel_axis=p.channel_axis, z_axis=p.z_axis,
        )
        self.refuse_described_changes(vol.describe())
        vol.reads = self.reads("input")
        return vol

    @property
    def anisotropy(self) -> float:
        return float(self.manifest["anisotropy"])

    @property
    def npredict(self) -> int:
        """The number of predict units (``run.json`` ``predict.units``; 0 without predict)."""
        return int((self.manifest.get("predict") or {}).get("units", 0))

    @property
    def plane(self) -> dict | None:
        """For one compartment of a 2D slide run, its 2D settings (``flow_threshold``,
        ``patches``, ``patch_size``): what makes the one-plane run follow Cellpose's 2D eval."""
        return self.manifest.get("plane")

    @property
    def stitching(self) -> bool:
        """Stitch mode (``--stitch-threshold``): 2D masks per plane, stitched across Z."""
        return float(self.params.stitch_threshold) > 0

    @property
    def planar(self) -> bool:
        """Whether every plane is segmented on its own (a slide's one plane, or stitch mode)."""
        return self.plane is not None or self.stitching

    # -- two scales (--no-resample) ----------------------------------------------------------
    @property
    def resamples(self) -> bool:
        """Whether the flows are followed at the volume's scale (Cellpose's ``resample=True``);
        with ``--no-resample`` the flows, seeds and network-scale masks live on the network grid
        (``run.json`` ``network_grid``), and ``masks:resize`` brings the masks back."""
        return bool(self.params.resample)

    #: Whether this context's grid is the network grid (:meth:`network_scale`).
    at_network_scale = False

    @functools.cached_property
    def network_grid(self) -> ChunkGrid:
        """The grid the stages at the network's scale work on: the volume's own without
        ``--no-resample``."""
        g = self.manifest.get("network_grid")
        return self.grid if g is None else ChunkGrid(tuple(g["shape"]), tuple(g["chunk_shape"]), tuple(g["halo"]))

    def network_scale(self) -> "RunContext":
        """This run as the stages at the network's scale see it (``predict:combine``, ``seeds``,
        ``number``, ``masks``): the same folder, the network grid. Without ``--no-resample`` the
        run itself."""
        if self.resamples:
            return self
        return self.__dict__.setdefault("_network", NetworkScale(self.root, self.manifest))


class NetworkScale(RunContext):
    """A ``--no-resample`` run on its network grid (:meth:`RunContext.network_scale`)."""

    at_network_scale = True

    def __init__(self, root: str, manifest: dict):
        super().__init__(root, manifest)
        self.grid = self.network_grid


def _ints(value, n: int, low: int) -> bool:
    return (isinstance(value, list) and len(value) == n
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value))


def check_manifest(m) -> list[str]:
    """What is wrong with a manifest read from ``run.json`` (empty when it is consistent).

    Types and ranges of every value a phase uses, and agreement between the recorded chunk
    grid, the input shape and the parameters, so a hand-edited manifest is refused with the
    value at fault instead of failing deep inside a phase.
    """
    if not isinstance(m, dict):
        return [f"it holds a {type(m).__name__}, not a JSON object"]
    missing = [k for k in ("params", "input", "grid", "niter", "anisotropy", "complete") if k not in m]
    if missing:
        return [f"{', '.join(missing)} missing"]
    problems = []
    params = None
    try:
        params = RunParams.model_validate(m["params"])
    except ValidationError as e:
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            problems.append(f"params.{loc} = {err.get('input')!r}: {err['msg'].removeprefix('Value error, ')}")
    g, shape = m["grid"], (m["input"] or {}).get("shape") if isinstance(m["input"], dict) else None
    if not isinstance(g, dict):
        return problems + ["grid is not an object"]
    nd = len(g.get("shape") or [])
    bad_grid = [f"grid.{key} = {g.get(key)!r}: need {nd or 3} whole numbers >= {low}"
                for key, low in (("shape", 1), ("chunk_shape", 1), ("halo", 0), ("grid_shape", 1))
                if not _ints(g.get(key), nd or 3, low)]
    if not isinstance(g.get("nchunks"), int) or isinstance(g.get("nchunks"), bool):
        bad_grid.append(f"grid.nchunks = {g.get('nchunks')!r}: need a whole number")
    problems += bad_grid
    if bad_grid:
        return problems
    grid = ChunkGrid(tuple(g["shape"]), tuple(g["chunk_shape"]), tuple(g["halo"]))
    if list(grid.grid_shape) != g["grid_shape"] or grid.nchunks != g["nchunks"]:
        problems.append(f"grid.grid_shape {g['grid_shape']} / nchunks {g['nchunks']} do not follow from "
                        f"shape {g['shape']} and chunk_shape {g['chunk_shape']}")
    if shape != g["shape"]:
        problems.append(f"grid.shape {g['shape']} is not the input's shape {shape}")
    if params is not None and params.chunk_shape is not None and list(params.chunk_shape) != g["chunk_shape"]:
        problems.append(f"grid.chunk_shape {g['chunk_shape']} is not params.chunk_shape {list(params.chunk_shape)}")
    if params is not None and params.halo is not None and list(params.halo) != g["halo"]:
        problems.append(f"grid.halo {g['halo']} is not params.halo {list(params.halo)}")
    if params is not None and not params.resample:  # --no-resample: the network grid too
        ng = m.get("network_grid")
        if not isinstance(ng, dict) or not all(_ints(ng.get(k), nd, low) for k, low in
                                               (("shape", 1), ("chunk_shape", 1), ("halo", 0))):
            problems.append(f"network_grid = {ng!r}: a --no-resample run needs its shape, chunk_shape and halo, "
                            f"{nd} whole numbers each")
    niter, aniso = m["niter"], m["anisotropy"]
    if not isinstance(niter, int) or isinstance(niter, bool) or niter < 1:
        problems.append(f"niter = {niter!r}: need a whole number >= 1")
    if not isinstance(aniso, (int, float)) or isinstance(aniso, bool) or not (aniso > 0 and math.isfinite(aniso)):
        problems.append(f"anisotropy = {aniso!r}: need a positive number")
    if not isinstance(m["complete"], bool):
        problems.append(f"complete = {m['complete']!r}: need true or false")
    elif m["complete"]:
        cells = (m.get("result") or {}).get("cells") if isinstance(m.get("result"), dict) else None
        if not isinstance(cells, int) or isinstance(cells, bool) or cells < 0:
            problems.append(f"result.cells = {cells!r}: a finished run records its cell count")
    return problems


def write_manifest(root: str, manifest: dict) -> None:
    U.write_json(U.join(root, MANIFEST), manifest)
