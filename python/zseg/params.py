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


def _channel(c):
    """One ``--channels`` item: an index (``"2"`` -> 2) or a channel name."""
    return int(c) if isinstance(c, str) and c.strip().lstrip("-").isdigit() else c


#: What --bsize takes (Cellpose 3 checks nothing; a U-Net needs a multiple of 16).
BSIZE_RULE = "use a multiple of 16 from 64 to 1024 (e.g. 224 or 512)"


def bsize_ok(v: int) -> bool:
    """Whether ``v`` is a tile size zseg runs or trains a Cellpose 3 network on (:data:`BSIZE_RULE`)."""
    return 64 <= v <= 1024 and v % 16 == 0


def channel_list(value):
    """``--channels`` as written (``"1,membrane"``, ``"1 2"`` or a list): indices as int, names as str."""
    value = _split(value)
    return [_channel(c) for c in value] if isinstance(value, (list, tuple)) else value


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
    """Start from this precomputed flow store instead of running the network: a zarr array (4, Z, Y, X) = dZ, dY, dX, cellprob for a volume; (3, Y, X) = dY, dX, cellprob of the whole cells for a 2D slide."""
    nuclear_flows: str | None = None
    """2D slides: precomputed flows of the nuclei, a zarr array (3, Y, X) = dY, dX, cellprob (the nuclear counterpart of --flows)."""

    # -- what to read --------------------------------------------------------------------------
    axes: str | None = None
    """Axis order of a plain zarr array or TIFF, e.g. zyx, czyx, zcyx, or cyx, yxc for a 2D slide (OME-Zarr carries its own); default zyx for 3D, czyx for 4D."""
    channel_axis: int | None = Field(None, ge=0)
    """Cellpose's --channel_axis: the 0-based position of the channel axis of a plain array or TIFF (with --axes or OME metadata it must agree)."""
    z_axis: int | None = Field(None, ge=0)
    """Cellpose's --z_axis: the 0-based position of the z axis of a plain array or TIFF (with --axes or OME metadata it must agree)."""
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

    # -- 2D multiplex slides -------------------------------------------------------------------
    compartment: Literal["whole-cell", "nuclear", "both"] | None = None
    """2D slides: what to segment (Mesmer's names): whole-cell, nuclear, or both (one ID per cell across cells, nuclei and cytoplasm); default both with --membrane-channels, else nuclear. Giving it marks the input as a 2D slide."""
    nuclear_channel: int | str | None = None
    """2D slides: the nuclear channel, by OME name or index; default: the first channel."""
    membrane_channels: list[int | str] | None = Field(None, min_length=1)
    """2D slides: the membrane / whole-cell channels (names or indices), combined pixelwise by --membrane-combine on raw values and normalised as one channel."""
    membrane_combine: Literal["max", "mean", "sum"] = "max"
    """2D slides: how several membrane channels are combined pixelwise (max is the reference pipeline's rule)."""
    nuclear_diameter: float | None = Field(None, gt=0)
    """2D slides: typical nucleus diameter in pixels for the nuclear network; default --diameter."""
    nuclear_model: str | None = None
    """2D slides: the network for the nuclei, given like --model; default --model."""
    flow_threshold: float = Field(0.4, ge=0)
    """2D slides and stitch mode: 2D masks whose flow error exceeds this are removed, once per whole mask (Cellpose's 2D flow_threshold); 0 switches the check off."""
    patch_size: int = Field(512, ge=16)
    """2D slides: side in pixels of the fixed grid of QC patches (patches.parquet), independent of the chunking."""
    patch_non_zero_threshold: float = Field(0.05, ge=0, le=1)
    """2D slides: a patch whose nuclear channel has a smaller non-zero fraction is empty."""
    patch_mean_threshold: float = 1.0
    """2D slides: a patch whose nuclear channel has a smaller mean (raw units) is noisy."""
    skip_uninformative: bool = True
    """2D slides: no cell is seeded in an empty or noisy patch (its flows still serve a neighbour's cell, so no cell is cut)."""
    keep_unmatched_cells: bool = False
    """2D slides with --compartment both: also keep cells without a nucleus (their cytoplasm is the whole cell)."""
    keep_unmatched_layers: bool = False
    """2D slides with --compartment both: also write the compartments' own labels as cells_unmatched and nuclei_unmatched."""
    anndata: bool = False
    """2D slides: also write cells.h5ad (AnnData: cell means per channel, nucleus and cytoplasm as layers, obsm spatial in micrometres); its memory grows with cells x channels."""
    geojson: bool = False
    """2D slides: also write cells.geojson (QuPath cell objects with nucleus geometry and measurements), streamed."""

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
    norm_per_plane: bool = False
    """Normalise each Z plane by its own percentiles (Cellpose's normalize={"norm3D": False}; the large-scale pipelines' local normalisation) for dim or unevenly lit volumes."""
    tile_norm_blocksize: int = Field(0, ge=0)
    """Normalise by the percentiles of blocksize-pixel tiles of each plane, on Cellpose's fixed tile grid, smoothed and averaged over Z (Cellpose's tile_norm_blocksize, e.g. 100), for unevenly lit volumes; 0: off."""
    invert: bool = False
    """Invert each channel after normalisation (1 - x), for dark cells on a bright background (Cellpose's invert)."""
    tile_overlap: float = Field(0.1, ge=0.05, le=0.5)
    """Fraction of a network tile shared with its neighbour (Cellpose's tile_overlap, 0.05-0.5)."""
    augment: bool = False
    """Cellpose's test-time augmentation: tiles overlap by half and are flipped (about 4x the tiles)."""
    bsize: int | None = None
    """Network tile side in pixels (Cellpose's bsize): a Cellpose 3 model takes a multiple of 16 from 64 to 1024 (default 224; 512 helps cells with long thin protrusions); a CPSAM model only its own (256)."""
    batch_size: int = Field(8, ge=1)
    """Network tiles per forward pass (Cellpose's batch_size); raise it on a large GPU, lower it on out-of-memory."""
    use_bfloat16: bool = True
    """Run the network in bfloat16 as Cellpose 4 does (about half the memory); --no-use-bfloat16 for float32."""
    skip_empty: bool = True
    """Do not run the network on predict units whose input is nowhere above the low percentile (their tiles give flows 0 and no cells)."""
    mask: str | None = None
    """Only run the network where this volume (any resolution, e.g. a low-resolution foreground mask) is nonzero."""
    predict_memory: float = Field(12.0, gt=0)
    """GiB of host memory one predict task may use for a unit (its input and sums at network scale): units get as many tiles per axis as fit. Flows do not depend on it."""
    keep_views: bool = False
    """Also keep the three views' predictions (work/views.zarr) for inspection."""
    flows_dtype: Literal["float16", "float32"] = "float16"
    """Store the predicted flows (work/flows.zarr) as float16 (half the storage) or float32 (Cellpose keeps float32; rounding to float16 moves a few cells' voxels)."""

    # -- dynamics ------------------------------------------------------------------------------
    cellprob_threshold: float = 0.0
    """Voxels with cell probability (sum of the three views' logits) above this are followed."""
    niter: int | None = Field(None, ge=1)
    """Euler steps of flow following; default 200 * diameter / diam_mean as Cellpose (diam_mean 30, or a Cellpose 3 model's own), 200 with --no-resample. Long thin cells need more."""
    resample: bool = True
    """Follow the flows at the volume's own scale (Cellpose's resample=True); --no-resample follows them at the network's scale and resizes the masks back (Cellpose's resample=False: much less time and memory when the network scale is smaller, e.g. a diameter above 30, as Cellpose's 3D documentation advises); 3D segmentation only."""
    stitch_threshold: float = Field(0.0, ge=0, le=1)
    """Cellpose's stitch_threshold: above 0, each Z plane is segmented in 2D (do_3D=False) and masks of neighbouring planes with an IoU above it are stitched into one cell; 0: Cellpose's 3D segmentation."""
    flow3D_smooth: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Gaussian sigma Z,Y,X (voxels) applied to the flows before following them; one number for all axes."""
    min_size: int = 15
    """Cells with fewer voxels are removed (decided once per cell over the whole volume); -1 keeps all."""
    max_size: int | None = Field(None, ge=1)
    """Cells with more voxels are removed; default: no limit."""
    exclude_on_edges: bool = False
    """Remove cells touching a face of the volume (a slide's edges), as Cellpose's --exclude_on_edges; a chunk's faces never count."""

    # -- chunking and execution ----------------------------------------------------------------
    chunk_shape: tuple[int, ...] | None = None
    """Core shape Z,Y,X of a task (Y,X for a 2D slide); also the chunk shape of every array written; default 128,256,256 (2D: 2048,2048)."""
    halo: tuple[int, ...] | None = None
    """Voxels Z,Y,X (2D: Y,X) read around each core; default 2 x diameter (Z divided by the anisotropy; 2D: 4 x the larger diameter, for the flow check)."""
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
        "channels", "voxel_size", "percentiles", "chunk_shape", "halo", "membrane_channels", mode="before"
    )
    @classmethod
    def _lists_from_text(cls, v):
        return _split(v)

    @field_validator("channels", "membrane_channels", mode="before")
    @classmethod
    def _channel_items(cls, v):
        return channel_list(v)

    @field_validator("nuclear_channel", mode="before")
    @classmethod
    def _channel_item(cls, v):
        return _channel(v)

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
        if v is not None and len(v) not in (2, 3):
            raise ValueError("give Z,Y,X for a volume or Y,X for a 2D slide, e.g. 128,256,256 or 2048,2048")
        if v is not None and any(s <= 0 for s in v):
            raise ValueError("every side must be at least 1 voxel; use e.g. 128,256,256")
        return v

    @field_validator("halo")
    @classmethod
    def _halo_nonneg(cls, v):
        if v is not None and len(v) not in (2, 3):
            raise ValueError("give Z,Y,X for a volume or Y,X for a 2D slide, e.g. 8,32,32 or 96,96")
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

    @field_validator("bsize")
    @classmethod
    def _bsize(cls, v):
        if v is not None and not bsize_ok(v):
            raise ValueError(BSIZE_RULE)
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
        if len(set(v)) != len(v) or not set(v) <= set("tczyx") or not {"y", "x"} <= set(v):
            raise ValueError("name each axis once with letters from t,c,z,y,x, including y and x (e.g. czyx, or "
                             "cyx for a 2D slide)")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        base = v.split(":")[0]
        if base not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError("use auto, cpu, cuda, cuda:N or mps")
        return v

    @model_validator(mode="after")
    def _one_local_normalisation(self):
        if self.norm_per_plane and self.tile_norm_blocksize:
            raise ValueError("--norm-per-plane and --tile-norm-blocksize are two local normalisations: choose one "
                             "(Cellpose's 3D run applies its tiles to the whole stack)")
        return self

    @model_validator(mode="after")
    def _stitch_mode(self):
        if self.stitch_threshold > 0:
            given = [flag_of(n) for n in STITCH_EXCLUDES if getattr(self, n) != RunParams.model_fields[n].default]
            if given:
                raise ValueError(f"--stitch-threshold segments each plane in 2D, so {', '.join(given)} "
                                 "(3D segmentation only) cannot apply; leave it out or set --stitch-threshold 0")
        return self

    @model_validator(mode="after")
    def _sizes(self):
        if self.max_size is not None and self.min_size > 0 and self.max_size < self.min_size:
            raise ValueError(
                f"--max-size {self.max_size} is below --min-size {self.min_size}: every cell would be removed"
            )
        return self

    # -- derived values ------------------------------------------------------------------------
    def effective_niter(self, diam_mean: float = 30.0) -> int:
        """Cellpose's default: 200 steps at the network's ``diam_mean`` (30 for cpsam, cyto*;
        the value stored in a Cellpose 3 model's weights), scaled with the diameter."""
        if self.niter is not None:
            return self.niter
        if not self.resample:  # Cellpose: niter_scale = 1 when not resampling
            return 200
        return max(1, int(200 / (diam_mean / self.diameter)))  # Cellpose's arithmetic: 200 / rescale

    def slide_options(self) -> list[str]:
        """The 2D-slide options given a value other than their default (what marks a slide run)."""
        return [name for name in SLIDE_ONLY if getattr(self, name) != RunParams.model_fields[name].default
                and not (name in STITCH_TOO and self.stitch_threshold > 0)]

    def work_uri(self) -> str:
        return self.work or join(self.output, "work")


#: Options of 2D multiplex slides only (refused on a volume).
SLIDE_ONLY = ("compartment", "nuclear_channel", "membrane_channels", "membrane_combine", "nuclear_diameter",
              "nuclear_model", "nuclear_flows", "flow_threshold", "patch_size", "patch_non_zero_threshold",
              "patch_mean_threshold", "skip_uninformative", "keep_unmatched_cells", "keep_unmatched_layers",
              "anndata", "geojson")
#: Options of 2D slides that stitch mode (--stitch-threshold) takes as well (its planes are 2D).
STITCH_TOO = ("flow_threshold",)
#: Options of Cellpose's 3D segmentation that stitch mode (--stitch-threshold) refuses.
STITCH_EXCLUDES = ("model_ortho", "flow3D_smooth", "exclude_on_edges", "resample")
#: Options of 3D volumes only (refused on a 2D slide).
VOLUME_ONLY = ("channels", "anisotropy", "flow3D_smooth", "model_ortho", "timepoint", "z_axis", "norm_per_plane",
               "tile_norm_blocksize", "stitch_threshold", "resample")

def flag_of(name: str) -> str:
    """The command-line flag that sets RunParams field ``name`` away from its default (``--no-x``
    for a switch that is on by default)."""
    flag = name.replace("_", "-")
    return f"--no-{flag}" if RunParams.model_fields[name].default is True else f"--{flag}"


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
        if not e["loc"]:  # a rule about several parameters together: name them in the message, not the dict
            lines.append(f"{msg}; fix it in the config file or on the command line.")
        elif e["type"] == "missing":
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
