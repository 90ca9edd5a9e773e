"""The run manifest (``OUTPUT/run.json``) and the handle every phase works through.

A run folder holds ``run.json`` (written once by ``plan``) and the phases' outputs. Each
per-chunk result file is written atomically and *last*, after the chunk's array data, so its
presence is the chunk's completion marker: ``zseg run`` and Nextflow ``-resume`` skip chunks
whose marker exists, and a killed task leaves no marker behind.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import platform

from zseg import __version__
from zseg.errors import UserError
from zseg.pipeline.params import RunParams
from zseg.storage import uri as U
from zseg.storage.grid import ChunkGrid

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


class Run:
    """A planned run: its parameters, input description, chunk grid and file layout."""

    def __init__(self, root: str, manifest: dict):
        self.root = str(root)
        self.manifest = manifest
        self.params = RunParams.model_validate(manifest["params"])
        g = manifest["grid"]
        self.grid = ChunkGrid(tuple(g["shape"]), tuple(g["chunk_shape"]), tuple(g["halo"]))

    @classmethod
    def open(cls, root: str) -> "Run":
        path = U.join(root, MANIFEST)
        if not U.exists(path):
            raise UserError(
                f"{root!r} is not a planned zseg run (no {MANIFEST}); run `zseg plan INPUT {root}` first."
            )
        try:
            manifest = U.read_json(path)
            return cls(root, manifest)
        except UserError:
            raise
        except Exception as e:  # a manifest edited by hand or truncated
            raise UserError(
                f"{path!r} is not a valid zseg manifest ({type(e).__name__}: {e}); "
                "re-plan the run with `zseg plan ... --overwrite`."
            ) from None

    # -- layout ------------------------------------------------------------------------------
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

    # -- inputs ------------------------------------------------------------------------------
    @functools.cached_property
    def volume(self):
        from zseg.storage.volume import open_volume

        p = self.params
        return open_volume(
            p.input, axes=p.axes, level=p.level, channels=p.channels, timepoint=p.timepoint
        )

    @property
    def anisotropy(self) -> float:
        return float(self.manifest["anisotropy"])


def write_manifest(root: str, manifest: dict) -> None:
    U.write_json(U.join(root, MANIFEST), manifest)
