"""``nextflow_schema.json`` generated from the parameter model, plus the Nextflow-only parameters.

The Nextflow pipeline passes every :class:`~zseg.params.RunParams` field to
``zseg plan`` as the flag of the same name, so its parameters *are* the model's fields, with
three differences, all listed here:

- ``output`` is called ``outdir`` (the nf-core name for the results folder);
- ``workers`` does not apply: Nextflow runs one task per shard of chunks (see ``shard_size``);
- a few parameters exist only on the Nextflow side (:data:`NEXTFLOW_ONLY`): how chunks are
  grouped into tasks, queues, the synthetic test volume, where Nextflow's reports go.

``python -m zseg.schema > nextflow_schema.json`` writes the schema (JSON Schema draft
2020-12 with nf-core's ``$defs`` groups); ``--markdown`` prints the parameter table of
``docs/nextflow.md``. A test fails when either file drifts from this module.
"""

from __future__ import annotations

import json
import os
import re
import sys
import typing

import annotated_types
from pydantic.fields import FieldInfo

from zseg.errors import UserError
from zseg.params import RunParams

SCHEMA_URI = "https://json-schema.org/draft/2020-12/schema"

#: RunParams fields that Nextflow calls by another name.
RENAMED = {"output": "outdir"}

#: RunParams fields that are not Nextflow parameters, and why.
NOT_IN_NEXTFLOW = {
    "workers": "Nextflow runs one task per shard of chunks; use shard_size and the executor's limits instead.",
}

#: RunParams fields whose validator also accepts one number for every axis.
_ONE_FOR_ALL_AXES = {"flow3D_smooth"}

#: Parameters of the Nextflow pipeline only (name -> JSON schema property). Their defaults are
#: also written in nextflow.config; a test keeps the two equal.
NEXTFLOW_ONLY: dict[str, dict] = {
    "shard_size": {
        "type": "integer",
        "minimum": 1,
        "default": 16,
        "description": "Chunks per task of a map stage (percentiles, seeds, masks, finalize): a run of N chunks "
        "becomes ceil(N / shard_size) tasks per stage. Larger shards mean fewer, longer tasks.",
    },
    "synth": {
        "type": "string",
        "pattern": r"^\s*\d+\s*[,\s]\s*\d+\s*[,\s]\s*\d+\s*$",
        "description": "Z,Y,X shape of a synthetic volume (with its exact flows) to make with `zseg synth` and "
        "segment instead of input and flows; used by -profile test.",
    },
    "synth_multiplex": {
        "type": "string",
        "pattern": r"^\s*\d+\s*[,\s]\s*\d+\s*$",
        "description": "Y,X shape of a synthetic multiplex slide (DAPI, Membrane and marker channels, with the exact flows "
        "of cells and nuclei) to make with `zseg synth --multiplex` and segment instead of input and flows; used by "
        "-profile test_multiplex.",
    },
    "tracedir": {
        "type": "string",
        "format": "directory-path",
        "default": "pipeline_info",
        "description": "Folder for Nextflow's execution report, timeline and trace (relative to the launch "
        "folder). Keep it outside outdir: zseg refuses a non-empty output folder that is not a zseg run.",
    },
    "queue": {
        "type": "string",
        "description": "Queue (SLURM partition, AWS Batch job queue) for the CPU tasks; required by -profile "
        "awsbatch; default: the executor's default queue.",
    },
    "account": {
        "type": "string",
        "description": "SLURM account to charge the tasks to (sbatch --account) under -profile slurm.",
    },
    "aws_region": {
        "type": "string",
        "description": "AWS region of the Batch queue and the S3 stores under -profile awsbatch (e.g. eu-west-1); "
        "default: the AWS configuration of the launching machine.",
    },
    "gpu_queue": {
        "type": "string",
        "description": "Queue or partition for the GPU tasks (label process_gpu) with -profile gpu; default: queue.",
    },
    "max_cpus": {
        "type": "integer",
        "minimum": 1,
        "description": "Most CPUs a task may request; default: this machine's CPUs on the local executor, no cap "
        "under -profile slurm, awsbatch or google.",
    },
    "max_memory": {
        "type": "string",
        "pattern": r"^\d+(\.\d+)?\s*\.?\s*(K|M|G|T)B$",
        "description": "Most memory a task may request, e.g. '64 GB'; default: this machine's memory on the "
        "local executor, no cap under -profile slurm, awsbatch or google.",
    },
    "max_time": {
        "type": "string",
        "pattern": r"^\d+(\.\d+)?\s*(s|m|h|d)$",
        "description": "Longest time a task may request, e.g. '48h'; default 240h on the local executor.",
    },
    "models_dir": {
        "type": "string",
        "format": "directory-path",
        "description": "Cellpose's model folder, where a built-in --model name (cpsam, cyto3, ...) is looked up and "
        "cpsam is downloaded to; mounted into containers at the same path. Default: $CELLPOSE_LOCAL_MODELS_PATH of "
        "the launching shell, else ~/.cellpose/models. On AWS Batch and Google Batch give a folder the workers "
        "have, or --model as a path to weights that they can read.",
    },
    "gpu_type": {
        "type": "string",
        "description": "Accelerator type requested for a GPU task with -profile gpu, where the executor "
        "needs one (Google Batch, e.g. nvidia-l4); ignored by SLURM and AWS Batch.",
    },
}

#: The groups of the schema: (key, title, icon, description, members). RunParams fields that are
#: in no group land in "other_options", so a new field is never dropped.
GROUPS = [
    ("input_output_options", "Input/output options", "fas fa-terminal",
     "Where the volume is, where the results go.",
     ["input", "outdir", "work", "flows", "nuclear_flows", "synth", "synth_multiplex"]),
    ("input_reading_options", "Reading the input", "fas fa-microscope",
     "Which part of the input to segment, and its geometry.",
     ["axes", "channel_axis", "z_axis", "level", "channels", "timepoint", "voxel_size", "anisotropy"]),
    ("slide_options", "2D multiplex slides", "fas fa-layer-group",
     "Compartments, channels, patches, matching and outputs of 2D multiplex slides.",
     ["compartment", "nuclear_channel", "membrane_channels", "membrane_combine", "nuclear_diameter", "nuclear_model",
      "flow_threshold", "patch_size", "patch_non_zero_threshold", "patch_mean_threshold", "skip_uninformative",
      "keep_unmatched_cells", "keep_unmatched_layers", "anndata", "geojson"]),
    ("network_options", "Network", "fas fa-brain",
     "The Cellpose network and the intensity normalisation.",
     ["model", "model_ortho", "models_dir", "diameter", "percentiles", "exclude_zeros", "norm_per_plane", "tile_norm_blocksize", "invert", "bsize", "tile_overlap", "augment", "batch_size", "use_bfloat16",
      "skip_empty", "mask", "predict_memory", "keep_views", "flows_dtype"]),
    ("dynamics_options", "Flow dynamics and cell sizes", "fas fa-wind",
     "Turning flows into cells (Cellpose's parameter names).",
     ["cellprob_threshold", "niter", "resample", "stitch_threshold", "flow3D_smooth", "min_size", "max_size",
      "exclude_on_edges"]),
    ("chunking_options", "Chunking and execution", "fas fa-th",
     "How the volume is cut into tasks, and what a run writes.",
     ["chunk_shape", "halo", "shard_size", "device", "zarr_format", "cells_csv", "overwrite"]),
    ("nextflow_options", "Nextflow", "fas fa-cogs",
     "Queues, accelerators and reports of the Nextflow run.",
     ["queue", "gpu_queue", "account", "aws_region", "gpu_type", "max_cpus", "max_memory", "max_time", "tracedir"]),
]
OTHER_GROUP = ("other_options", "Other zseg parameters", "fas fa-question", "Parameters without a group yet.")

REQUIRED = ["outdir"]

_NUM = r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?"
_INT = r"\d+"
_SEP = r"\s*[,\s]\s*"


def _list_pattern(item: str, counts: list[int]) -> str:
    alts = "|".join(item + f"({_SEP}{item}){{{n - 1}}}" if n > 1 else item for n in counts)
    return rf"^\s*({alts})\s*$"


def _fmt(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _default(value):
    if isinstance(value, (tuple, list)):
        return ",".join(_fmt(v) for v in value)
    return value


def _without_none(annotation):
    """``X | None`` -> ``X``; anything else unchanged."""
    args = typing.get_args(annotation)
    rest = [a for a in args if a is not type(None)]
    return rest[0] if len(args) == 2 and len(rest) == 1 else annotation


def _property(name: str, field: FieldInfo) -> dict:
    """One RunParams field as a Nextflow schema property (lists and tuples as text, e.g. "1,2,3")."""
    base = _without_none(field.annotation)
    prop: dict = {}
    origin = typing.get_origin(base)
    if base is bool:
        prop["type"] = "boolean"
    elif base is int:
        prop["type"] = "integer"
    elif base is float:
        prop["type"] = "number"
    elif origin is typing.Literal:
        values = list(typing.get_args(base))
        prop["type"] = "integer" if all(isinstance(v, int) for v in values) else "string"
        prop["enum"] = values
    elif origin is tuple:
        items = typing.get_args(base)
        if items[-1] is Ellipsis:  # Z,Y,X for a volume or Y,X for a slide
            items, counts = items[:-1], [2, 3]
        else:
            counts = sorted({1, len(items)}) if name in _ONE_FOR_ALL_AXES else [len(items)]
        item = _INT if all(t is int for t in items) else _NUM
        prop["type"] = "string"
        prop["pattern"] = _list_pattern(item, counts)
    elif origin is list:
        prop["type"] = "string"
        lo = next((m.min_length for m in field.metadata if isinstance(m, annotated_types.MinLen)), 1)
        hi = next((m.max_length for m in field.metadata if isinstance(m, annotated_types.MaxLen)), None)
        prop["pattern"] = rf"^\s*[^,\s]+({_SEP}[^,\s]+){{{lo - 1},{'' if hi is None else hi - 1}}}\s*$"
    else:
        prop["type"] = "string"
    for m in field.metadata:
        if isinstance(m, annotated_types.Ge):
            prop["minimum"] = m.ge
        elif isinstance(m, annotated_types.Gt):
            prop["exclusiveMinimum"] = m.gt
        elif isinstance(m, annotated_types.Le):
            prop["maximum"] = m.le
    prop["description"] = field.description or ""
    if not field.is_required() and field.default is not None:
        prop["default"] = _default(field.default)
    if name in ("input", "mask"):
        prop["format"] = "path"
    elif name in ("output", "work", "flows", "nuclear_flows"):
        prop["format"] = "directory-path"
    return prop


#: RunParams fields that hold a path or URI (relative local paths are the launch folder's), and
#: those that hold a model: a name (cpsam) or a path (anything with a slash or a .pt/.pth suffix).
PATH_FIELDS = ("input", "output", "work", "flows", "nuclear_flows", "mask")
MODEL_FIELDS = ("model", "model_ortho", "nuclear_model")


def _is_remote(value: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value) is not None


def resolve_path(value, launch_dir: str | None):
    text = str(value)
    if _is_remote(text) or launch_dir is None:
        return text
    return os.path.normpath(os.path.join(launch_dir, os.path.expanduser(text)))


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def params_from_nextflow(values: dict) -> dict:
    """The RunParams values of a Nextflow run's ``params`` (as main.nf's plan task writes them).

    Nextflow's names become the model's (``outdir`` -> ``output``; ``chunk-shape`` and Nextflow's
    camelCase copy ``chunkShape`` -> ``chunk_shape``), Nextflow-only parameters are dropped, empty
    values mean zseg's default, and relative local paths (and model paths) are resolved against
    ``launch_dir``, the folder ``nextflow run`` was started in. A parameter that is neither a field
    nor Nextflow-only (a typo) is refused, one line each.
    """
    values = dict(values)
    launch_dir = values.pop("launch_dir", None)
    back = {v: k for k, v in RENAMED.items()}
    out, unknown = {}, []
    for key, value in values.items():
        name = key.replace("-", "_")
        name = back.get(name, name)
        if name not in RunParams.model_fields:
            name = back.get(_snake(key), _snake(key))
        if name in NEXTFLOW_ONLY or name in NOT_IN_NEXTFLOW:
            continue
        if name not in RunParams.model_fields:
            unknown.append(key)
            continue
        if value is None or value == "":
            continue
        if name in PATH_FIELDS:
            value = resolve_path(value, launch_dir)
        elif name in MODEL_FIELDS and ("/" in str(value) or str(value).endswith((".pt", ".pth"))):
            value = resolve_path(value, launch_dir)
        out[name] = value
    if unknown:
        raise UserError(*(f"--{k} is not a parameter of the zseg pipeline; see docs/nextflow.md for the list."
                          for k in sorted(unknown)))
    return out


def nextflow_params() -> dict[str, dict]:
    """Every Nextflow parameter (name -> schema property), RunParams fields first."""
    props = {}
    for name, field in RunParams.model_fields.items():
        if name in NOT_IN_NEXTFLOW:
            continue
        props[RENAMED.get(name, name)] = _property(name, field)
    for name, prop in NEXTFLOW_ONLY.items():
        if name in props:
            raise ValueError(f"Nextflow-only parameter {name!r} is also a RunParams field")
        props[name] = dict(prop)
    return props


def build_schema() -> dict:
    """The content of ``nextflow_schema.json``."""
    props = nextflow_params()
    defs = {}
    placed = set()
    for key, title, icon, description, members in GROUPS:
        group = {name: props[name] for name in members if name in props}
        placed |= set(group)
        defs[key] = {"title": title, "type": "object", "fa_icon": icon, "description": description,
                     "properties": group}
        required = [r for r in REQUIRED if r in group]
        if required:
            defs[key]["required"] = required
    rest = {name: p for name, p in props.items() if name not in placed}
    if rest:
        key, title, icon, description = OTHER_GROUP
        defs[key] = {"title": title, "type": "object", "fa_icon": icon, "description": description,
                     "properties": rest}
    return {
        "$schema": SCHEMA_URI,
        "title": "zseg pipeline parameters",
        "description": "Cellpose segmentation of microscopy volumes of any size, identical whatever the chunking. "
        "Generated from zseg.params.RunParams by `python -m zseg.schema`; do not edit.",
        "type": "object",
        "$defs": defs,
        "allOf": [{"$ref": f"#/$defs/{key}"} for key in defs],
    }


def render_json() -> str:
    return json.dumps(build_schema(), indent=4, ensure_ascii=False) + "\n"


def markdown_table(schema: dict | None = None) -> str:
    """The parameters as Markdown tables, one per group (for docs/nextflow.md)."""
    schema = schema or build_schema()
    lines = []
    for group in schema["$defs"].values():
        lines += [f"### {group['title']}", "", group["description"], "",
                  "| parameter | type | default | description |", "|---|---|---|---|"]
        for name, p in group["properties"].items():
            kind = p["type"]
            if "enum" in p:
                kind += " (" + " or ".join(map(str, p["enum"])) + ")"
            default = p.get("default")
            default = "" if default is None else f"`{json.dumps(default) if isinstance(default, bool) else default}`"
            req = " (required)" if name in group.get("required", []) else ""
            desc = p["description"].replace("|", "\\|")
            lines.append(f"| `--{name}`{req} | {kind} | {default} | {desc} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--markdown"]:
        sys.stdout.write(markdown_table())
    elif not argv:
        sys.stdout.write(render_json())
    else:
        sys.stderr.write("usage: python -m zseg.schema [--markdown] > nextflow_schema.json\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
