"""Finding, checking and loading the Cellpose network; choosing the torch device.

``--model`` is either a path to weights or a name:

1. an existing file path is used as is;
2. a name is looked up in Cellpose's model folder, ``$CELLPOSE_LOCAL_MODELS_PATH`` or
   ``~/.cellpose/models`` (where Cellpose itself caches ``cpsam``, ``cpsam_v2``, and where
   ``cellpose --add_model`` puts user models);
3. ``zseg-demo`` (:data:`BUNDLED`) is the small Cellpose 3 network shipped inside the package,
   trained on ``zseg synth`` volumes by ``scripts/train_demo_model.py`` (for demos and tests of
   the whole pipeline offline; it knows nothing of real cells);
4. a built-in CPSAM name missing there (:data:`BUILTIN`) is downloaded into that folder from
   Cellpose's address (``$ZSEG_MODEL_URL`` replaces it, e.g. a mirror), written to a
   temporary name and renamed, so a killed download leaves nothing half-written.

The weights tell the family (:func:`family`): a Cellpose 4 CPSAM state dict has ``W2``; a
Cellpose 3 one (``cyto``, ``cyto2``, ``cyto3``, ``nuclei`` or a model trained from them, saved as
Cellpose 3 saves them) has ``downsample.down.res_down_*`` and ``output.2.weight``. Each runs
with its own module and defaults: CPSAM on 256-pixel tiles, rescaled by ``30 / diameter``;
Cellpose 3 on 224-pixel tiles (Cellpose 3's padding), rescaled by ``diam_mean / diameter``
with the ``diam_mean`` stored in the weights, on 2 input channels (cytoplasm, optional nucleus).

Anything else stops with one message that says where to put the weights. There is no
fallback to another model (Cellpose 4 warns and silently uses ``cpsam_v2`` for a name it
does not know).

:func:`inspect_model` reads a checkpoint's tensor shapes through a memory map (no weights in
memory), so ``plan`` checks the model before writing anything; :func:`load_network` builds
the network once per process and keeps it (:mod:`zseg.engine.cpsam`).
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

import torch

from zseg.engine.cp3 import CP3Net, cp3_from_state_dict, describe_cp3_state_dict, is_cp3_state_dict
from zseg.engine.cpsam import CPSAMNet, cpsam_from_state_dict, describe_state_dict
from zseg.errors import UserError
from zseg.storage.uri import atomic_local_file

log = logging.getLogger(__name__)

#: Built-in names zseg can download (CPSAM networks; Cellpose 4.2's default is cpsam_v2).
BUILTIN = ("cpsam", "cpsam_v2")
#: Networks shipped inside the package, by name, and their files in ``zseg/data``.
BUNDLED = {"zseg-demo": "zseg_demo_cp3.pt"}
#: Cellpose 3's built-in names and the files Cellpose 3 caches them as in the model folder
#: (zseg runs them from there but does not download them).
CP3_FILES = {"cyto3": "cyto3", "cyto2": "cyto2torch_0", "cyto": "cytotorch_0", "nuclei": "nucleitorch_0"}
#: Cellpose 4.2 models on the DINOv3 backbone, which zseg does not run.
DINO = ("cpdino", "cpdino-vitb")
#: Where Cellpose 4.2 downloads its models from.
CELLPOSE_URL = "https://huggingface.co/mouseland/cellpose-sam/resolve/main/"
DOWNLOAD_TIMEOUT = 60  # seconds without data before a download is given up

#: What a ``--model`` file may hold, for messages.
KINDS = "a Cellpose 4 (cpsam/cpsam_v2) or Cellpose 3 (cyto3, nuclei, ... or a model trained from them) weights file"

_NETWORKS: dict[tuple, "CPSAMNet | CP3Net"] = {}


def model_dir() -> Path:
    """Cellpose's model folder, read now (Cellpose reads it once, when imported)."""
    env = os.environ.get("CELLPOSE_LOCAL_MODELS_PATH")
    return Path(env) if env else Path.home() / ".cellpose" / "models"


def _where_to_put(name: str) -> str:
    return (
        f"put the weights file at {model_dir() / name} (or set CELLPOSE_LOCAL_MODELS_PATH to the folder "
        f"that holds it), or give --model /path/to/weights"
    )


def resolve_model(model: str, *, download: bool = True) -> Path:
    """The weights file ``model`` names (see the module docstring); ``UserError`` if there is none."""
    text = str(model).strip()
    if not text:
        raise UserError("--model is empty; give a built-in name (cpsam, cpsam_v2) or a path to weights.")
    path = Path(text).expanduser()
    if path.is_file():
        return path.resolve()
    if path.exists():
        raise UserError(f"--model {text!r} is a folder, not a weights file; give the path of the file itself.")
    looks_like_path = os.sep in text or "/" in text or text.endswith((".pt", ".pth"))
    if looks_like_path:
        raise UserError(f"--model {text!r}: no such file; check the path, or give a built-in name (cpsam, cpsam_v2).")
    cached = model_dir() / text
    if cached.is_file():
        return cached
    if text in CP3_FILES and (model_dir() / CP3_FILES[text]).is_file():
        return model_dir() / CP3_FILES[text]
    if text in BUNDLED:
        bundled = Path(str(resources.files("zseg") / "data" / BUNDLED[text]))
        if not bundled.is_file():
            raise UserError(f"--model {text!r}: the bundled file {bundled} is missing; reinstall zseg.")
        return bundled
    if text in CP3_FILES:
        raise UserError(
            f"--model {text!r} is neither a file nor a model in {model_dir()}: it is a Cellpose 3 model, which zseg "
            f"runs but does not download; put Cellpose 3's file {CP3_FILES[text]} (from "
            f"https://www.cellpose.org/models/{CP3_FILES[text]}) at {model_dir() / CP3_FILES[text]}, or give its path."
        )
    if text in DINO:
        raise UserError(
            f"--model {text!r} is a Cellpose DINOv3 network, which zseg does not run; use cpsam or cpsam_v2."
        )
    if text not in BUILTIN:
        raise UserError(
            f"--model {text!r} is neither a file nor a model in {model_dir()}; give a built-in name "
            f"({', '.join(BUILTIN)}; {', '.join(BUNDLED)}, bundled) or the path to your weights."
        )
    if not download:
        raise UserError(f"model {text!r} is not in {model_dir()}; {_where_to_put(text)}.")
    return _download(text)


def _download(name: str) -> Path:
    base = os.environ.get("ZSEG_MODEL_URL") or CELLPOSE_URL
    url = base.rstrip("/") + "/" + name
    target = model_dir() / name
    log.warning("model %s is not in %s: downloading it from %s", name, model_dir(), url)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, atomic_local_file(str(target)) as f:
            while chunk := response.read(1 << 22):
                f.write(chunk)
    except (OSError, urllib.error.URLError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"model {name!r} is not in {model_dir()} and could not be downloaded from {url} ({reason}); "
            f"{_where_to_put(name)}."
        ) from None
    return target


def _state_dict(path: Path, *, mmap: bool) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # not a torch file, truncated, or pickled objects weights_only refuses
        raise UserError(
            f"--model {str(path)!r} is not a readable Cellpose weights file ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else 'unreadable'}); give {KINDS}."
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"--model {str(path)!r} does not hold a state dict of tensors; give {KINDS}.")
    return sd


def family(sd: dict) -> str:
    """``"cpsam"`` (Cellpose 4: the state dict has ``W2``) or ``"cp3"`` (Cellpose 3's CPnet:
    ``downsample.down.res_down_*``, ``output.2.weight``); ``""`` for neither."""
    keys = {k.removeprefix("module.") for k in sd}
    if "W2" in keys:
        return "cpsam"
    if is_cp3_state_dict(sd):
        return "cp3"
    return ""


def _describe(path: Path, sd: dict) -> dict:
    """The family and sizes of a state dict; ``UserError`` for one zseg cannot run."""
    kind = family(sd)
    if not kind:
        some = ", ".join(sorted(sd)[:3]) or "none"
        raise UserError(f"--model {str(path)!r} is a state dict of another architecture (tensors {some}, ...), "
                        f"neither Cellpose 4 nor Cellpose 3; give {KINDS}.")
    try:
        if kind == "cp3":
            return describe_cp3_state_dict(sd)
        return {"family": "cpsam", **describe_state_dict({k.removeprefix("module."): v for k, v in sd.items()})}
    except ValueError as e:
        name = "Cellpose 3" if kind == "cp3" else "Cellpose 4 (CPSAM)"
        raise UserError(f"--model {str(path)!r} looks like a {name} network but {e}; "
                        f"give an unmodified {name} weights file.") from None


def inspect_model(model: str, *, download: bool = True) -> dict:
    """Resolve ``model`` and read its network sizes without loading the weights.

    Returns
    -------
    dict
        ``name`` (as given), ``path``, ``bytes``, ``family`` (``cpsam`` or ``cp3``), ``bsize``
        (tile size), ``diam_mean`` (the diameter the network rescales to) and ``network`` (the
        sizes of :func:`zseg.engine.cpsam.describe_state_dict` or
        :func:`zseg.engine.cp3.describe_cp3_state_dict`).
    """
    path = resolve_model(model, download=download)
    sizes = _describe(path, _state_dict(path, mmap=True))
    if sizes["family"] == "cp3":
        bsize, diam_mean = CP3Net.bsize, sizes["diam_mean"]
    else:
        bsize, diam_mean = sizes["tokens"] * sizes["ps"], 30.0
    return {
        "name": str(model), "path": str(path), "bytes": path.stat().st_size, "family": sizes["family"],
        "bsize": bsize, "diam_mean": diam_mean, "network": sizes,
    }


def _build(path: Path) -> "CPSAMNet | CP3Net":
    """A new network (float32, on the CPU) with the weights at ``path``, of the family they show;
    it has ``family`` set."""
    sd = _state_dict(path, mmap=False)
    kind = _describe(path, sd)["family"]
    name = "Cellpose 3" if kind == "cp3" else "cpsam/cpsam_v2"
    try:
        net = cp3_from_state_dict(sd) if kind == "cp3" else cpsam_from_state_dict(sd)
    except ValueError as e:
        raise UserError(f"--model {str(path)!r}: {e}; give an unmodified {name} weights file.") from None
    if kind != "cp3":
        net.family = "cpsam"
    return net


def load_network(path: str | Path, device: torch.device, *, use_bfloat16: bool = True,
                 keep: int = 1) -> "CPSAMNet | CP3Net":
    """The network of the weights at ``path`` on ``device``, of the family the weights show
    (:func:`family`); built once per process and reused (the last ``keep`` networks).

    A CPSAM network runs with bfloat16 weights by default, as Cellpose 4 runs it; a Cellpose 3
    network always in float32, as Cellpose 3 runs it. Every network has ``family``, ``bsize``
    (tile size) and ``diam_mean``.
    """
    path = Path(path)
    key = (str(path.resolve()), str(device), use_bfloat16)
    if key not in _NETWORKS:
        net = _build(path)
        if net.family == "cp3":
            net = net.to(device=device, dtype=torch.float32).eval()
            log.info("loaded %s (Cellpose 3, nbase %s, diam_mean %g) on %s", path, net.nbase,
                     float(net.diam_mean), device)
        else:
            net = net.to(device=device, dtype=torch.bfloat16 if use_bfloat16 else torch.float32).eval()
            log.info("loaded %s (%d blocks) on %s in %s", path, net.depth, device, net.dtype)
        while len(_NETWORKS) >= max(1, keep):  # a new one replaces the oldest
            _NETWORKS.pop(next(iter(_NETWORKS)))
        _NETWORKS[key] = net
    return _NETWORKS[key]


def trainable_network(path: str | Path, device: torch.device) -> "CPSAMNet | CP3Net":
    """A new float32 copy of the network at ``path`` (not the cached one :func:`load_network`
    keeps), to be trained."""
    return _build(Path(path)).to(device=device, dtype=torch.float32)


def select_device(spec: str = "auto") -> torch.device:
    """The torch device ``spec`` names: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``,
    ``cuda:N`` or ``mps``; ``UserError`` when it is not available here."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    base, _, index = spec.partition(":")
    if base == "cpu":
        return torch.device("cpu")
    if base == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        i = int(index) if index.isdigit() else 0
        if i >= n:
            have = f"{n} CUDA device(s)" if n else f"no CUDA device (torch {torch.__version__})"
            raise UserError(f"--device {spec}: this machine has {have}; use --device auto or cpu.")
        return torch.device(f"cuda:{i}")
    if base == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError(f"--device {spec}: MPS (Apple GPU) is not available here; use --device auto or cpu.")
        return torch.device("mps")
    raise UserError(f"--device {spec!r}: use auto, cpu, cuda, cuda:N or mps.")
