"""The stages of a run, in order: the one list the scheduler, the CLI, progress and Nextflow follow.

This is data only: each stage's name, its phase, its kind and where it leaves its markers.
Which function runs a stage is :mod:`zseg.run.tasks`' business (a layer above the phases).

A phase (docs/architecture.md, "Phases and stages") has one or more stages. A *map* stage
works on one chunk at a time and writes its chunk's marker ``work/<marker_dir>/cNNNNNNN.json``
last, after its data, so a marker means the chunk is complete. A *reduce* stage runs once and
writes ``work/<result>``. No stage starts while a stage before it in this list is incomplete
(:func:`zseg.workspace.progress.require_complete`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from zseg.workspace import work as W


def _always(run) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    name: str
    phase: str
    kind: Literal["map", "reduce"]
    marker_dir: str | None = None
    result: str | None = None
    applies: Callable = field(default=_always)
    """``applies(run)``: whether this run has the stage (predict is skipped with ``--flows``)."""
    over: Literal["chunks", "units"] = "chunks"
    """What a map stage's indices count: the chunks of the grid, or the predict units
    (:mod:`zseg.engine.units`, fixed by the volume and the network, never by the chunking)."""
    network: bool = False
    """The stage works at the network's scale: with ``--no-resample`` on the network grid
    (:func:`context`), else on the volume's grid like every other stage."""


def _predicts(run) -> bool:
    return run.params.flows is None


def resizes(run) -> bool:
    """A ``--no-resample`` volume run: masks made at the network's scale, resized back."""
    return not getattr(run, "resamples", True)


def stitching(run) -> bool:
    """A volume run in stitch mode (``--stitch-threshold``)."""
    return bool(getattr(run, "stitching", False))


def fills_over(run) -> bool:
    """Cellpose fills each cell's holes over the cells they enclose, decided per whole cell by
    ``finalize:holes`` (in 3D for a volume, in 2D for a slide or a one-plane image). In stitch
    mode each plane's 2D masks are filled before stitching, in the stages that read them."""
    return not stitching(run)


def flow_check(run) -> bool:
    """Cellpose's 2D flow check is on: a 2D slide compartment, or a volume in stitch mode."""
    if stitching(run):
        return float(run.params.flow_threshold) > 0
    plane = getattr(run, "plane", None)
    return plane is not None and float(plane.get("flow_threshold", 0)) > 0


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("percentiles", "percentiles", "map", marker_dir=W.PERCENTILES_DIR),
    Stage("percentiles:reduce", "percentiles", "reduce", result=W.PERCENTILES_RESULT),
    Stage("predict", "predict", "map", marker_dir=W.PREDICT_DIR, applies=_predicts, over="units"),
    Stage("predict:combine", "predict", "map", marker_dir=W.COMBINE_DIR, applies=_predicts, network=True),
    Stage("seeds:follow", "seeds", "map", marker_dir=W.FOLLOW_DIR, network=True),
    Stage("seeds:find", "seeds", "map", marker_dir=W.SEEDS_DIR, network=True),
    Stage("number", "number", "reduce", result=W.NUMBER_RESULT, network=True),
    Stage("masks", "masks", "map", marker_dir=W.MASKS_DIR, network=True),
    Stage("masks:own", "masks", "reduce", result=W.OWN_RESULT, applies=resizes),
    Stage("masks:resize", "masks", "map", marker_dir=W.RESIZE_DIR, applies=resizes),
    Stage("finalize:sizes", "finalize", "map", marker_dir=W.SIZES_DIR),
    Stage("finalize:extent", "finalize", "reduce", result=W.EXTENT_RESULT, applies=flow_check),
    Stage("finalize:quality", "finalize", "map", marker_dir=W.QUALITY_DIR, applies=flow_check),
    Stage("finalize:holes", "finalize", "map", marker_dir=W.HOLES_DIR, applies=fills_over),
    Stage("finalize:overlaps", "finalize", "map", marker_dir=W.OVERLAPS_DIR, applies=stitching),
    Stage("finalize:stitch", "finalize", "reduce", result=W.STITCH_RESULT, applies=stitching),
    Stage("finalize:number", "finalize", "reduce", result=W.FINAL_NUMBER_RESULT),
    Stage("finalize:labels", "finalize", "map", marker_dir=W.LABELS_DIR),
    Stage("finalize:cells", "finalize", "map", marker_dir=W.CELLS_DIR),
    Stage("finalize:report", "finalize", "reduce", result=W.REPORT_RESULT),
)}
"""Every stage, in the order a run executes them."""


SLIDE_STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("slide:inputs", "slide", "map", marker_dir=W.SLIDE_INPUTS_DIR),
    Stage("slide:compartments", "slide", "reduce", result=W.COMPARTMENTS_RESULT),
    Stage("match:decide", "match", "map", marker_dir=W.MATCH_DIR, applies=lambda run: run.compartment == "both"),
    Stage("match:number", "match", "reduce", result=W.MATCH_RESULT, applies=lambda run: run.compartment == "both"),
    Stage("slide:layers", "slide", "map", marker_dir=W.LAYERS_DIR),
    Stage("slide:report", "slide", "reduce", result=W.REPORT_RESULT),
)}
"""The stages of a 2D slide run's own, in order; its compartments (one-plane runs of
:data:`STAGES`, planned by ``slide:compartments``) run between that stage and ``match:decide``."""


def stage_table(run) -> dict[str, Stage]:
    """The stages of ``run``'s kind: :data:`SLIDE_STAGES` for a slide run, else :data:`STAGES`."""
    return getattr(run, "stage_table", STAGES)


def noun(stage: Stage) -> str:
    """What one index of map stage ``stage`` counts, for messages: ``"unit"`` or ``"chunk"``."""
    return "unit" if stage.over == "units" else "chunk"


def context(run, stage: Stage):
    """The context ``stage``'s tasks work through: the run on its network grid for a stage at
    the network's scale (the run itself unless ``--no-resample``), else the run."""
    return run.network_scale() if stage.network and resizes(run) else run


def size(run, stage: Stage) -> int:
    """How many tasks map stage ``stage`` has: the chunks of its grid, or the run's predict units."""
    return run.npredict if stage.over == "units" else context(run, stage).grid.nchunks


def applicable(run) -> list[Stage]:
    """The stages of ``run``, in order."""
    return [s for s in stage_table(run).values() if s.applies(run)]
