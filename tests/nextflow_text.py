"""Reading the pipeline's Nextflow files as text, for tests that need no JVM and no Nextflow.

The modules follow one layout (nf-core style), which this parser relies on and the language
server test cross-checks: ``process NAME {`` at column 0, section labels (``input:``,
``output:``, ``script:``, ``stub:``) indented by four spaces, the closing ``}`` at column 0,
and a script or stub that is one triple-double-quoted string.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PROCESS = re.compile(r"^process\s+(\w+)\s*\{\s*$", re.M)
_SECTION = re.compile(r"^    (input|output|when|script|shell|exec|stub):\s*$", re.M)
_TRIPLE = re.compile(r'"""(.*?)"""', re.S)
_INTERP = re.compile(r"\$\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")


@dataclass
class ProcessText:
    name: str
    file: Path
    directives: str
    sections: dict[str, str]

    @property
    def script(self) -> str:
        """The shell template of ``script:`` (the triple-quoted string)."""
        return _template(self.sections.get("script", ""))

    @property
    def stub(self) -> str | None:
        return _template(self.sections["stub"]) if "stub" in self.sections else None

    @property
    def script_groovy(self) -> str:
        """The Groovy statements of ``script:`` before its template."""
        return self.sections.get("script", "").split('"""', 1)[0]

    def labels(self) -> list[str]:
        return re.findall(r"^\s*label\s+'([^']+)'", self.directives, re.M)

    def output_paths(self) -> list[str]:
        """The ``path(...)`` patterns declared under ``output:``, as templates."""
        return [m.group(2) for m in re.finditer(r"path\((['\"])(.+?)\1", self.sections.get("output", ""))]

    def input_paths(self) -> list[str]:
        """The ``path(...)`` declarations under ``input:`` (their whole argument text)."""
        return re.findall(r"\bpath\(([^)]*)\)", _strip_comments(self.sections.get("input", "")))


def _strip_comments(text: str) -> str:
    """Drop /* */ blocks and // comments (not the // of a URI such as s3://)."""
    text = re.sub(r"^[ \t]*/\*.*?\*/", "", text, flags=re.S | re.M)
    return re.sub(r"(^|\s)//[^\n]*", r"\1", text, flags=re.M)


def _template(section: str) -> str:
    m = _TRIPLE.search(section)
    if not m:
        raise ValueError(f"no triple-quoted template in:\n{section}")
    return m.group(1)


def nf_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for p in root.rglob("*.nf") if "tests" not in p.relative_to(root).parts[:1]
                  and not any(part.startswith(".") or part == "work" for part in p.relative_to(root).parts))


def config_files(root: Path = ROOT) -> list[Path]:
    return [root / "nextflow.config", *sorted((root / "conf").glob("*.config"))]


def processes(root: Path = ROOT) -> dict[str, ProcessText]:
    """Every process of the pipeline, by name."""
    found: dict[str, ProcessText] = {}
    for f in nf_files(root):
        text = f.read_text()
        for m in _PROCESS.finditer(text):
            end = text.index("\n}", m.end())
            body = text[m.end():end]
            marks = list(_SECTION.finditer(body))
            directives = body[: marks[0].start()] if marks else body
            sections = {}
            for i, s in enumerate(marks):
                stop = marks[i + 1].start() if i + 1 < len(marks) else len(body)
                sections[s.group(1)] = body[s.end():stop]
            if m.group(1) in found:
                raise ValueError(f"process {m.group(1)} is defined twice")
            found[m.group(1)] = ProcessText(m.group(1), f, directives, sections)
    return found


def render(template: str, values: dict[str, str]) -> str:
    """Fill a Groovy GString template: each ``${expr}`` from ``values[expr]`` (KeyError if unknown),
    then strip the common indentation, as Nextflow does with a process script."""
    if re.search(r"(?<![\\$])\$[A-Za-z_]", template):
        raise ValueError("write ${name}, not $name, in templates (the tests fill ${...} only)")

    def fill(m):
        key = m.group(1).strip()
        if key not in values:
            raise KeyError(f"no test value for ${{{key}}}")
        return str(values[key])

    return textwrap.dedent(_INTERP.sub(fill, template).replace("\\$", "$"))


def params_used(root: Path = ROOT) -> dict[str, set[Path]]:
    """Every ``params.NAME`` written in a .nf or .config file, with the files using it."""
    used: dict[str, set[Path]] = {}
    for f in nf_files(root) + config_files(root):
        for name in re.findall(r"\bparams\.([A-Za-z_][A-Za-z0-9_]*)", _strip_comments(f.read_text())):
            used.setdefault(name, set()).add(f)
    return used


def params_block(config: Path) -> dict[str, str]:
    """The top-level ``params { name = value }`` block of a config file: name -> value text."""
    text = config.read_text()
    m = re.search(r"^params\s*\{\s*$(.*?)^\}", text, re.M | re.S)
    if not m:
        return {}
    out = {}
    for line in _strip_comments(m.group(1)).splitlines():
        if line.strip():
            name, _, value = line.partition("=")
            out[name.strip()] = value.strip()
    return out


def groovy_literal(text: str):
    """A config literal (null, true/false, a number, a quoted string) as a Python value."""
    if text == "null":
        return None
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"-?\d+\.\d*", text):
        return float(text)
    m = re.fullmatch(r"'([^']*)'|\"([^\"$]*)\"", text)
    if m:
        return m.group(1) if m.group(1) is not None else m.group(2)
    raise ValueError(f"not a plain literal: {text}")


def workflow_body(path: Path, name: str) -> str:
    """The text of ``workflow NAME { ... }`` (up to the next line holding only ``}``)."""
    text = path.read_text()
    head = re.search(rf"^workflow\s+{name}\s*\{{\s*$" if name else r"^workflow\s*\{\s*$", text, re.M)
    if not head:
        raise ValueError(f"no workflow {name or '(entry)'} in {path}")
    end = text.index("\n}", head.end())
    return text[head.end():end]


def map_literal(body: str, variable: str) -> dict[str, str]:
    """``def VARIABLE = [ key: expr, ... ]`` (one entry per line) -> key -> expression text."""
    m = re.search(rf"def\s+{variable}\s*=\s*\[\s*\n(.*?)\n\s*\]", body, re.S)
    if not m:
        raise ValueError(f"no map literal {variable} = [...]")
    out = {}
    for line in _strip_comments(m.group(1)).splitlines():
        if line.strip():
            key, _, expr = line.strip().partition(":")
            out[key.strip()] = expr.strip().rstrip(",")
    return out


def process_calls(body: str) -> list[tuple[str, str]]:
    """``NAME(args)`` statements of a workflow body, in order: (process name, argument text)."""
    return re.findall(r"^\s*([A-Z][A-Z0-9_]+)\((.*)\)\s*$", body, re.M)
