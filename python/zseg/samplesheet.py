"""Samplesheets: several images in one run, one output folder ``OUTDIR/<sample>/`` each.

A samplesheet is a CSV file with a header row and the columns of ``assets/schema_input.json``
(nf-core's convention): ``sample`` (the name of the output folder), ``image`` (the volume) and
optionally ``flows`` (a precomputed flow store for that image; empty: the network computes
them). zseg validates it against that JSON schema itself, as the nf-schema plugin would (it
cannot be downloaded where the pipeline is tested), including nf-schema's two keywords of its
own: ``exists`` (the path or URI is there) and ``uniqueEntries`` (no two rows share a sample,
as two rows would write one folder). Relative paths in the sheet are relative to the folder the
run was started in, as with nf-schema.

``zseg run SHEET.csv OUTDIR`` runs the rows one after another; the Nextflow pipeline reads the
rows from ``zseg samplesheet`` and runs them side by side.
"""

from __future__ import annotations

import csv
import io
import json
from importlib.resources import files

import jsonschema

from zseg.errors import UserError
from zseg.schema import resolve_path
from zseg.storage import uri as uris

SCHEMA = json.loads(files("zseg").joinpath("data/schema_input.json").read_text())

#: The row fields that name a path or URI: resolved against the launch folder, checked to exist.
PATH_COLUMNS = ("image", "flows")


def is_samplesheet(value) -> bool:
    """Whether an input names a samplesheet (nf-core's rule: a ``.csv`` file)."""
    return str(value or "").lower().endswith(".csv")


def read_samplesheet(sheet: str, launch_dir: str | None = None) -> list[dict]:
    """The rows of the samplesheet at ``sheet`` (path or URI) as ``{"sample", "image"[, "flows"]}``,
    paths resolved against ``launch_dir``; every problem refused at once, one line each."""
    try:
        text = uris.read_bytes(sheet).decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"--input {sheet}: no such samplesheet.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--input {sheet}: cannot read the samplesheet ({e}).") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip() for name in reader.fieldnames or []]
    if not header:
        raise UserError(f"--input {sheet}: the samplesheet is empty; give a header row 'sample,image[,flows]' "
                        "and one row per image.")
    rows = []
    for record in reader:
        if None in record:  # more cells than the header has columns
            raise UserError(f"--input {sheet} line {reader.line_num}: {len(record) - 1 + len(record[None])} cells "
                            f"for the {len(header)} columns of the header ({','.join(header)}).")
        row = {name.strip(): (value or "").strip() for name, value in record.items()}
        if not any(row.values()):
            continue  # a blank line
        rows.append((reader.line_num, {k: v for k, v in row.items() if v}))
    problems = _problems(rows, header, launch_dir)
    if problems:
        raise UserError(*(f"--input {sheet} {where}: {what}" for where, what in problems))
    return [{k: (resolve_path(v, launch_dir) if k in PATH_COLUMNS else v) for k, v in row.items()} for _, row in rows]


def _problems(rows: list[tuple[int, dict]], header: list[str], launch_dir: str | None) -> list[tuple[str, str]]:
    items = SCHEMA["items"]
    known = list(items["properties"])
    unknown = [name for name in header if name not in known]
    if unknown:
        return [("header", f"unknown column(s) {', '.join(map(repr, unknown))}; the columns are {', '.join(known)}.")]
    missing = [name for name in items["required"] if name not in header]
    if missing:
        return [("header", f"no column {', '.join(map(repr, missing))}; the columns are {', '.join(known)} "
                           f"({', '.join(items['required'])} required).")]
    if len(rows) < SCHEMA.get("minItems", 0):
        return [("", "the samplesheet has a header but no rows; give one row per image.")]
    out = []
    validator = jsonschema.Draft202012Validator(items)
    for line, row in rows:
        where = f"line {line}" + (f" (sample {row['sample']})" if "sample" in row else "")
        for error in sorted(validator.iter_errors(row), key=lambda e: list(e.absolute_path)):
            out.append((where, _message(error)))
        for column in PATH_COLUMNS:
            prop = items["properties"].get(column, {})
            if prop.get("exists") and column in row and not uris.exists(resolve_path(row[column], launch_dir)):
                out.append((where, f"{column} {row[column]!r} does not exist."))
    for key in SCHEMA.get("uniqueEntries", []):
        seen: dict[str, int] = {}
        for line, row in rows:
            if key in row and row[key] in seen:
                out.append((f"line {line}", f"{key} {row[key]!r} is also on line {seen[row[key]]}; each row needs a "
                                            f"{key} of its own (it names the output folder)."))
            seen.setdefault(row.get(key), line)
    return out


def _message(error: jsonschema.ValidationError) -> str:
    """One line for a schema error: the column, the schema's errorMessage where it has one."""
    if error.validator == "required":
        return f"{error.message.split(' is a required property')[0].strip(chr(39))} is empty; it is required."
    column = error.absolute_path[0] if error.absolute_path else ""
    hint = error.schema.get("errorMessage")
    return f"{column} {error.instance!r}: {hint}." if hint else f"{column}: {error.message}."


def sample_runs(sheet: str, outdir: str, *, work: str | None = None, flows: str | None = None,
                launch_dir: str | None = None) -> list[dict]:
    """The rows of ``sheet`` (:func:`read_samplesheet`), each with its output folder ``OUTDIR/<sample>``
    (and work folder ``WORK/<sample>``). A run-wide ``flows`` is refused: flows belong to a row."""
    if flows is not None:
        raise UserError("--flows with a samplesheet: give each image's flows in the samplesheet's flows column.")
    out = []
    for row in read_samplesheet(sheet, launch_dir):
        run = dict(row, outdir=uris.join(outdir, row["sample"]))
        if work:
            run["work"] = uris.join(work, row["sample"])
        out.append(run)
    return out
