"""The ``zseg`` command line: one subcommand per phase, plus ``run`` and ``synth``.

Command bodies are thin: build the parameters, call one pipeline function. Options of
``plan`` and ``run`` are generated from :class:`zseg.params.RunParams`, so the CLI,
the config file and ``nextflow_schema.json`` cannot drift apart.

Exit codes: 0 success, 2 bad input or parameters (one line per problem), 1 anything else.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import sys
import typing
from typing import Optional

import typer

from zseg import __version__
from zseg.errors import UserError, write_failure
from zseg.outputs.verify import verify_output
from zseg.params import RunParams, build_params, channel_list
from zseg.phases.crops import make_crops
from zseg.phases.train import train as train_network
from zseg.phases.plan import plan as do_plan
from zseg.phases.slide import is_slide, plan_slide
from zseg.phases.synth import synth as do_synth
from zseg.phases.synth import synth_slide as do_synth_slide
from zseg.run.entry import finished, run_local, run_phase
from zseg.samplesheet import is_samplesheet, sample_runs
from zseg.schema import params_from_nextflow
from zseg.storage import fingerprint as FP
from zseg.workspace.lock import check_task, session_claim

app = typer.Typer(
    name="zseg",
    help="Cellpose segmentation of microscopy volumes of any size, identical whatever the chunking.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
log = logging.getLogger("zseg")

RunOpt = typer.Option(..., "--run", help="Run folder written by `zseg plan` (holds run.json).")
ChunksOpt = typer.Option(None, "--chunks", help="Chunk indices and inclusive ranges, e.g. 0-99,105 (default: all).")
ShardOpt = typer.Option(None, "--shard", help="i/N: the i-th (0-based) of N equal shares of the chunks.")
EmitOpt = typer.Option(None, "--emit", help="Also write a small JSON summary of this task to this local file.")
SessionOpt = typer.Option(None, "--session", help="The Nextflow session (workflow.sessionId) this task belongs to: "
                          "the pipeline passes it, and a folder of another session is refused.")


def _option_type(annotation):
    """The CLI type of a model field: numbers and flags typed, everything else text."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if len(args) == 1 else annotation
    if base is bool:
        return Optional[bool]
    if base in (int, float):
        return Optional[base]
    if typing.get_origin(base) is typing.Literal and all(isinstance(v, int) for v in typing.get_args(base)):
        return Optional[int]
    return Optional[str]


def param_options(exclude=("input", "output")):
    """Decorator: add one ``--kebab-case`` option per parameter-model field to a command.

    The wrapped function receives ``flags``: the options the user gave (None for the others).
    """

    def deco(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.name != "flags"]
        extra = []
        for name, field in RunParams.model_fields.items():
            if name in exclude:
                continue
            flag = "--" + name.replace("_", "-")
            decls = [f"{flag}/--no-{flag[2:]}"] if _option_type(field.annotation) is Optional[bool] else [flag]
            extra.append(
                inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(None, *decls, help=field.description),
                    annotation=_option_type(field.annotation),
                )
            )

        @functools.wraps(fn)
        def wrapper(**kwargs):
            flags = {n: kwargs.pop(n) for n in list(kwargs) if n in RunParams.model_fields and n not in exclude}
            return fn(flags=flags, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + extra)
        return wrapper

    return deco


def _emit(path: Optional[str], payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)


def _read_json(path: str, flag: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {path!r} cannot be read as JSON ({e}).") from None
    if not isinstance(data, dict):
        raise UserError(f"{flag} {path!r} holds a {type(data).__name__}, not a JSON object of parameters.")
    return data


def _params(input: str, output: str, config: Optional[str], flags: dict) -> RunParams:
    return build_params(config, input=input, output=output, **flags)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"zseg {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log output (-v INFO, -vv DEBUG)."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                 help="Print the version and exit."),
):
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@app.command()
@param_options()
def plan(
    input: Optional[str] = typer.Argument(None, help="Input volume (path or s3://, gs:// URI)."),
    output: Optional[str] = typer.Argument(None, help="Output/run folder (path or s3://, gs:// URI)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML/JSON parameter file; flags win."),
    nextflow_params: Optional[str] = typer.Option(
        None, "--nextflow-params", help="JSON of a Nextflow run's params (what the pipeline's plan task writes): "
        "Nextflow's names, relative paths against its launch_dir; flags win."),
    emit: Optional[str] = EmitOpt,
    check_model: bool = typer.Option(False, "--check-model/--no-check-model",
                                     help="Also find and check the network now (download a missing built-in one)."),
    session: Optional[str] = SessionOpt,
    *,
    flags: dict,
):
    """Validate input and parameters, fix the chunk grid, write OUTPUT/run.json."""
    if nextflow_params is not None:
        if config is not None:
            raise UserError("give --config or --nextflow-params, not both.")
        values = params_from_nextflow(_read_json(nextflow_params, "--nextflow-params"))
        input, output = input or values.pop("input", None), output or values.pop("output", None)
        given = {k: v for k, v in flags.items() if v is not None}  # flags win over the JSON
        params = build_params(None, **{**values, "input": input, "output": output, **given})
    elif input is None or output is None:
        raise UserError("give INPUT and OUTPUT (or --nextflow-params): `zseg plan INPUT OUTPUT [options]`.")
    else:
        params = _params(input, output, config, flags)
    if is_samplesheet(params.input):
        raise UserError(f"INPUT {params.input} is a samplesheet; zseg plan plans one image: "
                        "`zseg run SHEET OUTDIR` or `nextflow run main.nf --input SHEET` runs every row.")
    if session is None:
        check_task(params.output, None)
    with session_claim(params.output, session) if session is not None else contextlib.nullcontext():
        summary = _plan(params, check_model)
    _emit(emit, summary)
    typer.echo(json.dumps(summary))


def _plan(params: RunParams, check_model: bool) -> dict:
    if is_slide(params):  # its compartments' networks are checked when they are planned (zseg slide --stage compartments)
        run = plan_slide(params)
        summary = {"run": run.root, "nchunks": run.grid.nchunks, "grid": run.manifest["grid"], "kind": "slide",
                   "compartment": run.compartment}
    else:
        run = do_plan(params, check_model=check_model)
        summary = {"run": run.root, "nchunks": run.grid.nchunks, "npredict": run.npredict,
                   "grid": run.manifest["grid"], "kind": "volume"}
    return summary


@app.command()
@param_options()
def run(
    input: str = typer.Argument(..., help="Input volume (path or s3://, gs:// URI)."),
    output: str = typer.Argument(..., help="Output folder (path or s3://, gs:// URI)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML/JSON parameter file; flags win."),
    *,
    flags: dict,
):
    """Every phase in this process (a pool of --workers), resuming an unfinished run. INPUT may be a
    samplesheet (.csv: sample,image[,flows]): each row then runs in turn into OUTPUT/<sample>."""
    if not is_samplesheet(input):
        _run_one(_params(input, output, config, flags))
        return
    samples = sample_runs(input, output, work=flags.get("work"), flows=flags.get("flows"))
    for s in samples:  # one after another; a rerun resumes the unfinished ones and skips the finished
        if finished(s["outdir"]) and not flags.get("overwrite"):
            typer.echo(f"zseg: sample {s['sample']}: finished already in {s['outdir']}; skipped "
                       "(--overwrite recomputes every sample)", err=True)
            continue
        typer.echo(f"zseg: sample {s['sample']} -> {s['outdir']}", err=True)
        _run_one(_params(s["image"], s["outdir"], config, {**flags, "flows": s.get("flows"), "work": s.get("work")}))


def _run_one(params: RunParams) -> None:
    result = run_local(params)
    if result.get("skipped"):
        done = "; ".join(k if v == "done" else f"{k} {v}" for k, v in result["skipped"].items())
        typer.echo(f"zseg: resumed an unfinished run, skipping the work already done: {done}", err=True)
    typer.echo(json.dumps(result))


@app.command()
def samplesheet(
    sheet: Optional[str] = typer.Argument(None, help="Samplesheet (.csv: sample,image[,flows]; path or URI)."),
    outdir: Optional[str] = typer.Argument(None, help="Folder that gets one output folder per sample."),
    nextflow_params: Optional[str] = typer.Option(
        None, "--nextflow-params", help="JSON of a Nextflow run's params: the sheet is its input, the folder its outdir."),
    emit: Optional[str] = EmitOpt,
):
    """Validate a samplesheet against assets/schema_input.json; print its rows with their output folders."""
    work = flows = launch_dir = None
    if nextflow_params is not None:
        raw = _read_json(nextflow_params, "--nextflow-params")
        values = params_from_nextflow(raw)
        sheet, outdir = sheet or values.get("input"), outdir or values.get("output")
        work, flows, launch_dir = values.get("work"), values.get("flows"), raw.get("launch_dir")
    if sheet is None or outdir is None:
        raise UserError("give SHEET and OUTDIR (or --nextflow-params): `zseg samplesheet SHEET OUTDIR`.")
    samples = sample_runs(sheet, outdir, work=work, flows=flows, launch_dir=launch_dir)
    _emit(emit, {"samples": samples})
    typer.echo(json.dumps({"samples": samples}))


def _map_or_reduce(phase: str, run: str, chunks, shard, stage: Optional[str], reduce: bool, emit, session=None):
    summary = run_phase(run, phase, stage=stage, chunks=chunks, shard=shard, reduce=reduce, session=session)
    _emit(emit, summary)
    typer.echo(json.dumps(summary))


@app.command()
def percentiles(run: str = RunOpt, chunks: Optional[str] = ChunksOpt, shard: Optional[str] = ShardOpt,
                reduce: bool = typer.Option(False, "--reduce", help="Merge all chunk histograms (after the map)."),
                emit: Optional[str] = EmitOpt, session: Optional[str] = SessionOpt):
    """Exact global intensity percentiles: per-chunk histograms (map), then --reduce."""
    _map_or_reduce("percentiles", run, chunks, shard, None, reduce, emit, session)


@app.command()
def predict(run: str = RunOpt, chunks: Optional[str] = ChunksOpt, shard: Optional[str] = ShardOpt,
            stage: Optional[str] = typer.Option(
                None, "--stage", help="combine: sum the units' results into each chunk's flows (after every unit "
                "ran). Without it: run the predict units; --chunks and --shard then select units, not chunks."),
            emit: Optional[str] = EmitOpt, session: Optional[str] = SessionOpt):
    """The network's flows (dZ, dY, dX, cellprob), as Cellpose's whole-volume run gives them: each tile
    runs once, in predict units fixed by the volume and the network; then --stage combine writes each chunk."""
    _map_or_reduce("predict", run, chunks, shard, stage, False, emit, session)


@app.command()
def seeds(run: str = RunOpt, chunks: Optional[str] = ChunksOpt, shard: Optional[str] = ShardOpt,
          stage: str = typer.Option(..., "--stage", help="follow (flows -> end points), then find (histogram -> seeds)."),
          emit: Optional[str] = EmitOpt, session: Optional[str] = SessionOpt):
    """Follow the flows of every foreground voxel once, then find the seeds each core owns."""
    _map_or_reduce("seeds", run, chunks, shard, stage, False, emit, session)


@app.command()
def number(run: str = RunOpt, emit: Optional[str] = EmitOpt, session: Optional[str] = SessionOpt):
    """Global seed IDs from per-chunk seed counts (a reduce)."""
    _map_or_reduce("number", run, None, None, None, True, emit, session)


@app.command()
def masks(run: str = RunOpt, chunks: Optional[str] = ChunksOpt, shard: Optional[str] = ShardOpt,
          stage: Optional[str] = typer.Option(
              None, "--stage", help="--no-resample runs only, after the masks: own (reduce: each seed's owner chunk "
              "and ID at the volume's scale), then resize (map: the masks resized back to the volume)."),
          emit: Optional[str] = EmitOpt, session: Optional[str] = SessionOpt):
    """Label each core voxel by the seed region its trajectory ends in."""
    _map_or_reduce("masks", run, chunks, shard, stage, stage == "own", emit, session)


@app.command()
def finalize(run: str = RunOpt, chunks: Optional[str] = ChunksOpt, shard: Optional[str] = ShardOpt,
             stage: str = typer.Option(..., "--stage", help="sizes (map), [holes (map): 3D runs], [extent (reduce), quality (map): 2D flow check], [overlaps (map), stitch (reduce): --stitch-threshold], number (reduce), labels (map), cells (map), report (reduce)."),
             emit: Optional[str] = EmitOpt, session: Optional[str] = SessionOpt):
    """Per-cell size decisions, consecutive IDs, labels.zarr and its pyramid, cells.parquet, the QC report."""
    _map_or_reduce("finalize", run, chunks, shard, stage, stage in ("number", "report"), emit, session)


@app.command()
def slide(run: str = RunOpt, chunks: Optional[str] = ChunksOpt, shard: Optional[str] = ShardOpt,
          stage: str = typer.Option(..., "--stage", help="inputs (map), compartments (reduce), layers (map), report (reduce)."),
          emit: Optional[str] = EmitOpt, session: Optional[str] = SessionOpt):
    """A 2D slide run's own stages: network inputs, planning its compartments, the output layers, the report."""
    _map_or_reduce("slide", run, chunks, shard, stage, stage in ("compartments", "report"), emit, session)


@app.command()
def match(run: str = RunOpt, chunks: Optional[str] = ChunksOpt, shard: Optional[str] = ShardOpt,
          stage: str = typer.Option(..., "--stage", help="decide (map), number (reduce)."),
          emit: Optional[str] = EmitOpt, session: Optional[str] = SessionOpt):
    """A 2D slide run's cell-nucleus matching: each chunk decides the components it owns, then one numbering."""
    _map_or_reduce("match", run, chunks, shard, stage, stage == "number", emit, session)


@app.command()
def fingerprint(
    stores: list[str] = typer.Argument(None, help="The stores a run reads (input, flows, mask, model: paths or "
                                       "URIs; empty ones are skipped)."),
    emit: Optional[str] = EmitOpt,
):
    """One hash of everything stored at each URI (one listing each): the Nextflow pipeline gives it to
    its plan task, so that an input replaced at the same URI is planned again, never CACHED."""
    found = {uri: FP.digest(uri) for uri in stores or [] if uri}
    summary = {"digest": FP.digest_of(found), "stores": found}
    _emit(emit, summary)
    typer.echo(json.dumps(summary))


@app.command()
def verify(output: str = typer.Argument(..., help="Output folder of a run (path or s3://, gs:// URI).")):
    """Check a finished output: every chunk as written, labels 1..N as recorded, valid metadata."""
    typer.echo(json.dumps(verify_output(output)))


@app.command()
def synth(
    output: str = typer.Argument(..., help="Folder to write image.ome.zarr (with labels/cells) and flows.zarr into."),
    shape: str = typer.Option(None, "--shape", help="Z,Y,X voxels of the volume (default 64,128,128); with --multiplex Y,X pixels of the slide (default 512,512)."),
    diameter: float = typer.Option(None, "--diameter", help="Mean cell diameter in YX voxels (default 16; with --multiplex 24)."),
    anisotropy: float = typer.Option(1.0, "--anisotropy", help="Z spacing over YX spacing (>= 1)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    flows: bool = typer.Option(True, "--flows/--no-flows", help="Also write exact Cellpose flows of the ground truth."),
    membrane: bool = typer.Option(False, "--membrane", help="Bright cell boundaries (a membrane stain) instead of bright interiors."),
    zarr_format: int = typer.Option(3, "--zarr-format", help="3 (OME-Zarr 0.5) or 2 (OME-Zarr 0.4)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing files."),
    multiplex: bool = typer.Option(False, "--multiplex", help="A 2D multiplex slide (slide.ome.zarr: DAPI, Membrane, markers; truth for cells and nuclei; truth.parquet; flows.zarr and nuclear_flows.zarr) instead of a volume."),
    markers: int = typer.Option(4, "--markers", help="With --multiplex: marker channels after DAPI and Membrane, with known per-cell means."),
):
    """A synthetic volume of touching cells with ground truth (and its exact flows), or a multiplex slide."""
    if multiplex:
        if membrane or anisotropy != 1.0:
            raise UserError("--membrane and --anisotropy describe a volume; leave them out with --multiplex.")
        out = do_synth_slide(output, shape=shape or "512,512", diameter=24.0 if diameter is None else diameter,
                             markers=markers, seed=seed, flows=flows, zarr_format=zarr_format, overwrite=overwrite)
    else:
        out = do_synth(output, shape=shape or "64,128,128", diameter=16.0 if diameter is None else diameter,
                       anisotropy=anisotropy, seed=seed, flows=flows, membrane=membrane, zarr_format=zarr_format,
                       overwrite=overwrite)
    typer.echo(json.dumps(out))


@app.command()
def crops(
    volume: str = typer.Argument(..., help="The volume: OME-Zarr, zarr array or TIFF, local or s3://."),
    outdir: str = typer.Argument(..., help="Folder for the crops (TIFF) and crops.json."),
    crop_size: int = typer.Option(512, "--crop-size", help="Side of a crop in pixels (Cellpose's make_train.py: 512)."),
    nimg_per_tif: int = typer.Option(10, "--nimg-per-tif", help="Crops per view (planes drawn without repeats; capped by the planes of that axis)."),
    anisotropy: Optional[float] = typer.Option(None, "--anisotropy", help="Z spacing over YX spacing: Z of ZY and ZX crops is stretched by it (default: from the voxel size, else 1)."),
    channels: Optional[str] = typer.Option(None, "--channels", help="Up to three channels by index or name, e.g. membrane,nucleus."),
    axes: Optional[str] = typer.Option(None, "--axes", help="Axes of a plain array or TIFF, e.g. czyx."),
    channel_axis: Optional[int] = typer.Option(None, "--channel-axis", help="Cellpose's channel_axis (0-based)."),
    z_axis: Optional[int] = typer.Option(None, "--z-axis", help="Cellpose's z_axis (0-based)."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the planes and windows."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a folder that is not empty."),
):
    """Random YX, ZY and ZX crops of a volume for labelling in Cellpose's GUI and training (Cellpose's make_train.py), reading only the crop windows."""
    index = make_crops(volume, outdir, crop_size=crop_size, nimg_per_tif=nimg_per_tif, anisotropy=anisotropy,
                       channels=channel_list(channels), axes=axes, channel_axis=channel_axis, z_axis=z_axis, seed=seed,
                       overwrite=overwrite)
    typer.echo(json.dumps({"outdir": outdir, "crops": len(index["crops"]),
                           "views": {v: sum(c["view"] == v for c in index["crops"]) for v in ("YX", "ZY", "ZX")}}))


@app.command()
def train(
    folder: str = typer.Argument(..., help="Folder of NAME.tif images and NAME_masks.tif labels (Cellpose's layout; zseg crops writes the images)."),
    model: str = typer.Option(..., "--model", help="The network to start from, of either family, given like zseg run's --model."),
    output: str = typer.Option(..., "--output", help="Where to write the trained weights (a .pt state dict; OUTPUT.json records the run)."),
    mask_filter: str = typer.Option("_masks", "--mask-filter", help="Suffix of the label images (Cellpose's --mask_filter)."),
    trust_seg_npy: bool = typer.Option(False, "--trust-seg-npy", help="Also read labels from Cellpose GUI NAME_seg.npy files, which are pickles: only files you made."),
    n_epochs: int = typer.Option(100, "--n-epochs", help="Passes over the images (Cellpose's default 100)."),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", help="Default: Cellpose's, 0.005 (Cellpose 3) or 1e-5 (CPSAM)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Default: 1e-5 (Cellpose 3) or 0.1 (CPSAM)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per step; default 8 (Cellpose 3) or 1 (CPSAM)."),
    bsize: Optional[int] = typer.Option(None, "--bsize", help="Training tile size; default 224 (Cellpose 3; 512 keeps thin protrusions), a CPSAM network's own 256."),
    no_rescale: bool = typer.Option(False, "--no-rescale", help="Cellpose 3: train without resizing cells to the network's diameter (thin features survive); CPSAM never rescales."),
    min_train_masks: int = typer.Option(5, "--min-train-masks", help="Images with fewer masks are left out (Cellpose's default 5)."),
    test_dir: Optional[str] = typer.Option(None, "--test-dir", help="A folder like FOLDER whose loss is reported after every epoch."),
    device: str = typer.Option("auto", "--device", help="auto (a GPU when there is one), cpu, cuda, cuda:N, mps."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output."),
):
    """Fine-tune a Cellpose 3 or CPSAM network on labelled 2D images with Cellpose's training objective."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[loss]}"),
                  TimeRemainingColumn(), transient=False) as bar:
        task = bar.add_task("training", total=n_epochs, loss="")

        def progress(epoch, loss, test_loss):
            text = f"loss {loss:.4f}" + (f", test {test_loss:.4f}" if test_loss is not None else "")
            bar.update(task, completed=epoch + 1, loss=text)

        out = train_network(folder, model=model, output=output, mask_filter=mask_filter, trust_seg_npy=trust_seg_npy,
                            n_epochs=n_epochs, learning_rate=learning_rate, weight_decay=weight_decay,
                            batch_size=batch_size, bsize=bsize, rescale=False if no_rescale else None,
                            min_train_masks=min_train_masks, test_dir=test_dir, device=device, overwrite=overwrite,
                            progress=progress)
    typer.echo(json.dumps({k: out[k] for k in ("output", "family", "n_epochs", "learning_rate", "batch_size", "bsize",
                                               "rescale")} | {"images": len(out["images"]),
                                                              "first_loss": out["train_loss"][0],
                                                              "last_loss": out["train_loss"][-1]}))


def main(argv=None) -> int:
    """Entry point: map errors to exit codes (2 for the user's, 1 for the rest)."""
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="zseg")
        return rv if isinstance(rv, int) else 0
    except UserError as e:
        for line in e.problems or [str(e)]:
            typer.echo(f"zseg: error: {line}", err=True)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        typer.echo("zseg: aborted", err=True)
        return 1
    except typer.TyperException as e:  # a usage error (unknown option, missing argument): exit code 2
        e.show()
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        failure = write_failure(e)  # a full or read-only disk outside a task (plan, ...): one line
        if failure is None:
            return _failed(e)
        typer.echo(f"zseg: error: {failure.problems[0]}", err=True)
        return 2
    except Exception as e:  # a bug or an environment failure: one line, the traceback at -vv
        return _failed(e)


def _failed(e: BaseException) -> int:
    log.debug("traceback", exc_info=e)
    typer.echo(f"zseg: failed: {type(e).__name__}: {e} (run with -vv for the traceback)", err=True)
    return 1


def entry() -> None:
    sys.exit(main())
