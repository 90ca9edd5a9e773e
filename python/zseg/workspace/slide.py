"""The context of a 2D multiplex slide run: its manifest ``OUTPUT/run.json`` (``"kind": "slide"``),
its 2D chunk grid, and its compartments, each a one-plane run (:class:`RunContext`) under
``work/<compartment>`` (docs/architecture.md, "Multiplex slides").

The slide run's own stages (:data:`zseg.workspace.stages.SLIDE_STAGES`) share the chunk grid of its
compartments (their grid is the same cores with a leading plane axis), so chunk ``i`` is the
same piece of the slide in every stage.
"""

from __future__ import annotations

import functools

from zseg.errors import UserError
from zseg.storage import uri as U
from zseg.storage.slide import open_slide
from zseg.workspace.context import ADVICE, MANIFEST, RunContext, WorkLayout, read_manifest
from zseg.workspace.stages import SLIDE_STAGES

#: The compartment runs of each ``--compartment``, as folders under ``work/``.
COMPARTMENT_RUNS = {"whole-cell": ("cells",), "nuclear": ("nuclei",), "both": ("cells", "nuclei")}
#: The network input of a slide run: ``work/inputs.zarr`` (C, 1, Y, X).
INPUTS = "inputs.zarr"
#: The patch table a slide run writes next to its labels.
PATCHES = "patches.parquet"


def is_slide_run(root: str) -> bool:
    m = read_manifest(root)
    return isinstance(m, dict) and m.get("kind") == "slide"


class SlideContext(WorkLayout):
    """A planned slide run as its stages see it: parameters, slide, grid, compartments, layout."""

    stage_table = SLIDE_STAGES
    plane = None

    @classmethod
    def open(cls, root: str) -> "SlideContext":
        m = read_manifest(root)
        if m is None:
            raise UserError(f"{root!r} is not a planned zseg run (no {MANIFEST}); run `zseg run INPUT {root}` first.")
        missing = [k for k in ("params", "input", "grid", "channels", "compartment", "complete") if k not in m]
        if missing:
            raise UserError(f"{U.join(root, MANIFEST)!r} was edited or damaged: {', '.join(missing)} missing; "
                            f"{ADVICE}.")
        return cls(root, m)

    # -- what the run is ------------------------------------------------------------------------
    @property
    def compartment(self) -> str:
        return self.manifest["compartment"]

    @property
    def channels(self) -> dict:
        """``{"names": [...], "nuclear": index or None, "membrane": [indices]}``."""
        return self.manifest["channels"]

    @functools.cached_property
    def slide(self):
        """The slide, each box read checked against the run's fingerprint of it."""
        p = self.params
        slide = open_slide(p.input, axes=p.axes, level=p.level, channel_axis=p.channel_axis)
        self.refuse_described_changes(slide.describe())
        slide.reads = self.reads("input")
        return slide

    @property
    def pixel_size_um(self) -> tuple[float, float]:
        return tuple(self.manifest.get("pixel_size_um") or (1.0, 1.0))

    def compartment_root(self, name: str) -> str:
        return self.path(name)

    def compartment_run(self, name: str) -> RunContext:
        """The finished one-plane run of compartment ``name`` (``cells`` or ``nuclei``)."""
        run = RunContext.open(self.compartment_root(name))
        if not run.manifest.get("complete"):
            raise UserError(f"the {name} compartment of {self.root} is not finished; run `zseg run` again to "
                            "resume it.")
        return run
