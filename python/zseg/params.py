"""The parameter model of a run: one pydantic model, filled from a YAML/JSON file and CLI flags.

Field names follow Cellpose where Cellpose has the parameter (``cellprob_threshold``,
``niter``, ``min_size``, ``flow3D_smooth``, ``anisotropy``, ``diameter``). The CLI options,
``nextflow_schema.json`` and the docs are generated from this model, so a field documented
here is documented everywhere.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from zseg.errors import UserError
from zseg.storage.uri import join


def _split(value):
    """Accept ``"1,2,3"`` or ``"1 2 3"`` where a list is expected (CLI flags, env)."""
    if isinstance(value, str):
        parts = [p for p in value.replace(",", " ").split() if p]
        return parts
    return value


class RunParams(BaseModel):
    """Everything that decides what a run computes and where it writes."""

    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True, frozen=False
    )

    # -- where ---------------------------------------------------------------------------------
    input: str
    """Input volume: OME-Zarr (0.4/0.5), a zarr v2/v3 array or a TIFF stack; a local path or s3:// or gs:// URI."""
    output: str
    """Output folder (local path or s3:// or gs:// URI): labels.zarr, cells.parquet, run.json, qc/, work/."""
    work: str | None = None
    """Folder for intermediates (flows, seeds, provisional labels); default OUTPUT/work. Deletable after a run."""
    flows: str | None = None
    """Start from this precomputed flow store (zarr array (4, Z, Y, X) = dZ, dY, dX, cellprob) instead of running the network."""

    # -- what to read --------------------------------------------------------------------------
    axes: str | None = None
    """Axis order of a plain zarr array or TIFF, e.g. zyx, czyx, zcyx (OME-Zarr carries its own); default zyx for 3D, czyx for 4D."""
    level: int = Field(0, ge=0)
    """Multiscale level of an OME-Zarr input to segment (0 = full resolution)."""
    channels: list[int | str] | None = Field(None, min_length=1, max_length=3)
    """Up to three channels, by index or OME channel name, in the order the network expects (e.g. membrane,nucleus); default: the only channel."""
    timepoint: int = Field(0, ge=0)
    """Time point of an input with a t axis."""
    voxel_size: tuple[float, float, float] | None = None
    """Voxel size Z,Y,X in micrometres; default: read from the input's metadata, else 1,1,1."""
    anisotropy: float | None = Field(None, gt=0)
    """Z voxel size over Y voxel size (Cellpose's anisotropy); default: from the voxel size."""

    # -- the network ---------------------------------------------------------------------------
    model: str = "cpsam"
    """Cellpose model: a path to weights, or a name in CELLPOSE_LOCAL_MODELS_PATH (~/.cellpose/models); cpsam and cpsam_v2 are downloaded there when missing; zseg-demo is the small demo network shipped with zseg (synthetic cells only). Cellpose 4 (CPSAM) and Cellpose 3 (cyto3, nuclei, ... and models trained from them) weights are told apart by their tensors."""
    model_ortho: str | None = None
    """A second network for the ZY and ZX views (Cellpose 3's pretrained_model_ortho), given like --model, of either family; default: --model runs all three views."""
    diameter: float = Field(30.0, gt=0)
    """Typical cell diameter in YX voxels; the volume is rescaled by 30/diameter for the network (a Cellpose 3 model: by its diam_mean/diameter, e.g. 17/diameter for nuclei)."""
    percentiles: tuple[float, float] = (1.0, 99.0)
    """Low and high intensity percentiles (0-100) for global normalisation."""
    exclude_zeros: bool = False
    """Leave voxels equal to 0 (padding after stitching) out of the percentiles."""
    tile_overlap: float = Field(0.1, ge=0.05, le=0.5)
    """Fraction of a network tile shared with its neighbour (Cellpose's tile_overlap, 0.05-0.5)."""
    augment: bool = False
    """Cellpose's test-time augmentation: tiles overlap by half and are flipped (about 4x the tiles)."""
    batch_size: int = Field(8, ge=1)
    """Network tiles per forward pass (Cellpose's batch_size); raise it on a large GPU, lower it on out-of-memory."""
    use_bfloat16: bool = True
    """Run the network in bfloat16 as Cellpose 4 does (about half the memory); --no-use-bfloat16 for float32."""
    skip_empty: bool = True
    """Do not run the network on blocks whose input is nowhere above the low percentile (their flows are 0)."""
    mask: str | None = None
    """Only run the network where this volume (any resolution, e.g. a low-resolution foreground mask) is nonzero."""
    keep_views: bool = False
    """Also keep the three views' predictions (work/views.zarr) for inspection."""
    flows_dtype: Literal["float16", "float32"] = "float16"
    """Store the predicted flows (work/flows.zarr) as float16 (half the storage) or float32 (Cellpose keeps float32; rounding to float16 moves a few cells' voxels)."""

    # -- dynamics ------------------------------------------------------------------------------
    cellprob_threshold: float = 0.0
    """Voxels with cell probability (sum of the three views' logits) above this are followed."""
    niter: int | None = Field(None, ge=1)
    """Euler steps of flow following; default 200 * diameter / diam_mean as Cellpose (diam_mean 30, or a Cellpose 3 model's own). Long thin cells need more."""
    flow3D_smooth: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Gaussian sigma Z,Y,X (voxels) applied to the flows before following them; one number for all axes."""
    min_size: int = 15
    """Cells with fewer voxels are removed (decided once per cell over the whole volume); -1 keeps all."""
    max_size: int | None = Field(None, ge=1)
    """Cells with more voxels are removed; default: no limit."""

    # -- chunking and execution ----------------------------------------------------------------
    chunk_shape: tuple[int, int, int] = (128, 256, 256)
    """Core shape Z,Y,X of a task; also the chunk shape of every array written."""
    halo: tuple[int, int, int] | None = None
    """Voxels Z,Y,X read around each core; default 2 x diameter (Z divided by the anisotropy)."""
    device: str = "auto"
    """Torch device for network and dynamics: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps."""
    workers: int = Field(1, ge=1)
    """Processes for CPU phases in a local run."""
    zarr_format: Literal[2, 3] = 3
    """Zarr format of the arrays written (3 by default; 2 for older readers)."""
    cells_csv: bool = False
    """Also write the cell table as OUTPUT/cells.csv (cells.parquet is always written)."""
    overwrite: bool = False
    """Replace an existing output folder (its contents are deleted)."""

    # -- validators ----------------------------------------------------------------------------
    @field_validator(
        "channels", "voxel_size", "percentiles", "chunk_shape", "halo", mode="before"
    )
    @classmethod
    def _lists_from_text(cls, v):
        return _split(v)

    @field_validator("channels", mode="before")
    @classmethod
    def _channel_items(cls, v):
        if isinstance(v, (list, tuple)):
            return [int(c) if isinstance(c, str) and c.strip().lstrip("-").isdigit() else c for c in v]
        return v

    @field_validator("flow3D_smooth", mode="before")
    @classmethod
    def _smooth_scalar(cls, v):
        v = _split(v)
        if isinstance(v, (int, float)):
            return (v, v, v)
        if isinstance(v, (list, tuple)) and len(v) == 1:
            return (v[0], v[0], v[0])
        return v

    @field_validator("chunk_shape")
    @classmethod
    def _chunk_positive(cls, v):
        if any(s <= 0 for s in v):
            raise ValueError("every side must be at least 1 voxel; use e.g. 128,256,256")
        return v

    @field_validator("halo")
    @classmethod
    def _halo_nonneg(cls, v):
        if v is not None and any(s < 0 for s in v):
            raise ValueError("a halo cannot be negative; use 0 or more voxels per axis")
        return v

    @field_validator("voxel_size")
    @classmethod
    def _voxel_positive(cls, v):
        if v is not None and any(not (s > 0 and math.isfinite(s)) for s in v):
            raise ValueError("voxel sizes must be positive micrometres, e.g. 2.0,0.5,0.5")
        return v

    @field_validator("flow3D_smooth")
    @classmethod
    def _smooth_nonneg(cls, v):
        if any(s < 0 for s in v):
            raise ValueError("sigmas cannot be negative; use 0 to switch smoothing off")
        return v

    @field_validator("percentiles")
    @classmethod
    def _percentile_range(cls, v):
        lo, hi = v
        if not (0 <= lo < hi <= 100):
            raise ValueError("need 0 <= low < high <= 100, e.g. 1,99")
        return v

    @field_validator("min_size")
    @classmethod
    def _min_size(cls, v):
        if v < -1:
            raise ValueError("use a voxel count >= 0, or -1 to keep every cell")
        return v

    @field_validator("axes")
    @classmethod
    def _axes(cls, v):
        if v is None:
            return v
        v = v.lower()
        if len(set(v)) != len(v) or not set(v) <= set("tczyx") or not {"z", "y", "x"} <= set(v):
            raise ValueError("name each axis once with letters from t,c,z,y,x, including z, y and x (e.g. czyx)")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        base = v.split(":")[0]
        if base not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError("use auto, cpu, cuda, cuda:N or mps")
        return v

    @model_validator(mode="after")
    def _sizes(self):
        if self.max_size is not None and self.min_size > 0 and self.max_size < self.min_size:
            raise ValueError(
                f"max_size {self.max_size} is below min_size {self.min_size}: every cell would be removed"
            )
        return self

    # -- derived values ------------------------------------------------------------------------
    def effective_niter(self, diam_mean: float = 30.0) -> int:
        """Cellpose's default: 200 steps at the network's ``diam_mean`` (30 for cpsam, cyto*;
        the value stored in a Cellpose 3 model's weights), scaled with the diameter."""
        if self.niter is not None:
            return self.niter
        return max(1, int(200 / (diam_mean / self.diameter)))  # Cellpose's arithmetic: 200 / rescale

    def work_uri(self) -> str:
        return self.work or join(self.output, "work")


_HINTS = {
    "input": "give the path or s3:// URI of the volume",
    "output": "give a folder path or s3:// URI for the results",
}


def format_errors(err: ValidationError) -> list[str]:
    """One line per problem: the field, the value given, why it is wrong, what to do."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not isinstance(p, int)) or "parameters"
        value = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            lines.append(f"{loc}: missing; {_HINTS.get(loc, 'set it in the config file or as a flag')}.")
        elif e["type"] == "extra_forbidden":
            lines.append(
                f"{loc}: not a zseg parameter (value {value!r}); check the spelling against `zseg run --help`."
            )
        else:
            flag = "--" + loc.replace("_", "-")
            lines.append(f"{loc} = {value!r}: {msg}. Fix it in the config file or with {flag}.")
    return lines


def load_config(path: str | Path | None) -> dict:
    """Parameters from a YAML or JSON file (JSON is YAML); an empty dict for no file."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(path)!r} does not exist; give the path of a YAML or JSON file.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {str(path)!r} is not valid YAML/JSON: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of parameter: value.")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_params(config: str | Path | None = None, **flags) -> RunParams:
    """The run's parameters: the config file, then CLI flags (flags given win)."""
    values = load_config(config)
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return RunParams.model_validate(values)
    except ValidationError as e:
        raise UserError(*format_errors(e)) from None
