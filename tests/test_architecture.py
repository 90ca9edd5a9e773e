"""The package keeps its layers (docs/architecture.md, "Layers"): the import-linter contract holds
and can fail, nothing zseg-internal is imported inside a function except the documented torch
modules, stage workers never load torch, and every bad-input row of the README names a test
that exists."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "zseg"
TESTS = ROOT / "tests"

#: The imports inside functions that docs/architecture.md allows: network modules (torch) in the
#: stages that run or load a network, so that other workers never import torch.
TORCH_MODULES = {"zseg.engine.views", "zseg.engine.units", "zseg.engine.training", "zseg.storage.models"}
LAZY_ALLOWED = {"phases/predict.py", "phases/seeds.py", "phases/plan.py", "phases/train.py"}


def _lint(config: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert exe, "import-linter (a test extra) is not installed"
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([exe, "--config", str(config), "--no-cache"], capture_output=True, text=True, env=env,
                          cwd=config.parent)


def test_the_layer_contract_holds():
    r = _lint(ROOT / "pyproject.toml", ROOT / "python")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 kept, 0 broken" in r.stdout, r.stdout


@pytest.mark.parametrize("module, line", [
    ("engine/pyramid.py", "from zseg.storage import uri"),  # the engine touches storage
    ("storage/grid.py", "from zseg.workspace import work"),  # a lower layer imports a higher one
    ("outputs/table.py", "from zseg.outputs import report"),  # a cycle: report imports labels, table...
])
def test_the_contract_catches_a_broken_layer(tmp_path, module, line):
    shutil.copytree(PACKAGE, tmp_path / "python" / "zseg", ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    if module == "outputs/table.py":  # close a loop: labels -> table -> labels
        (tmp_path / "python" / "zseg" / "outputs" / "labels.py").open("a").write("\nfrom zseg.outputs import table\n")
    target = tmp_path / "python" / "zseg" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    r = _lint(tmp_path / "pyproject.toml", tmp_path / "python")
    assert r.returncode != 0 and "BROKEN" in r.stdout, r.stdout + r.stderr


def _function_imports(path: Path):
    tree = ast.parse(path.read_text())
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("zseg")):
                for alias in node.names:  # from zseg.engine import views -> zseg.engine.views
                    base = node.module if node.level == 0 else "." * node.level + (node.module or "")
                    yield node.lineno, f"{base}.{alias.name}" if base.split(".")[-1] != alias.name else base
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("zseg"):
                        yield node.lineno, alias.name


def test_no_zseg_import_hides_inside_a_function():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for line, module in _function_imports(path):
            if rel in LAZY_ALLOWED and (module in TORCH_MODULES or module.rsplit(".", 1)[0] in TORCH_MODULES):
                continue
            found.append(f"{rel}:{line} imports {module}")
    assert not found, found


def test_stage_workers_do_not_import_torch():
    """A pool worker imports the stage table (``zseg.run.pool``); torch would cost it ~700 MiB."""
    code = "import sys, zseg.run.pool, zseg.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_every_stage_has_one_function():
    from zseg.run.tasks import BATCHES, FUNCTIONS
    from zseg.workspace.stages import SLIDE_STAGES, STAGES

    assert list(FUNCTIONS) == list(STAGES) + list(SLIDE_STAGES)
    assert set(BATCHES) <= {n for n, s in STAGES.items() if s.kind == "map"}


def _test_names() -> set[str]:
    names = set()
    for path in TESTS.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                names.add(node.name)
    return names


def test_every_bad_input_row_of_the_readme_names_an_existing_test():
    """Each row of the README's "input tried | what the user sees | test" tables names the tests
    that keep its exit code 2 and its one line; a renamed or deleted test breaks this."""
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| ") and line.rstrip().endswith("|")]
    tables, current = [], None
    for line in readme.splitlines():
        if line.startswith("| input tried | what the user sees | test |"):
            current = []
            tables.append(current)
        elif current is not None and line.startswith("|"):
            if not line.startswith("|---"):
                current.append(line)
        else:
            current = None
    assert len(tables) >= 3 and sum(map(len, tables)) >= 25, (len(tables), rows[:3])  # the parse found them
    have = _test_names()
    missing = []
    for table in tables:
        for row in table:
            cell = row.rstrip().rstrip("|").rsplit("|", 1)[1]
            named = re.findall(r"`(test_\w+)", cell)
            files = re.findall(r"`(tests/\w+\.py)`", cell)
            assert named or files, f"a bad-input row names no test: {row[:120]}"
            missing += [n for n in named if n not in have]
            missing += [f for f in files if not (ROOT / f).exists()]
    assert not missing, missing


def test_code_cites_only_files_the_repository_holds():
    """The design document is docs/architecture.md; nothing cites the old DESIGN.md."""
    assert (ROOT / "docs" / "architecture.md").exists()
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()
    cited = []
    for folder in ("python", "tests", "benchmarks", "scripts", "modules", "workflows", "conf", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path == Path(__file__).resolve():
                continue
            if path.suffix in {".py", ".nf", ".config", ".md", ".sh"} and "DESIGN.md" in path.read_text():
                cited.append(str(path.relative_to(ROOT)))
    for path in (ROOT / "main.nf", ROOT / "nextflow.config", ROOT / "README.md"):
        if "DESIGN.md" in path.read_text():
            cited.append(path.name)
    assert not cited, cited
