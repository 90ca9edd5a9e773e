"""Finding, checking and loading the Cellpose network; choosing the torch device.

``--model`` is either a path to weights or a name:

1. an existing file path is used as is;
2. a name is looked up in Cellpose's model folder, ``$CELLPOSE_LOCAL_MODELS_PATH`` or
   ``~/.cellpose/models`` (where Cellpose itself caches ``cpsam``, ``cpsam_v2``, and where
   ``cellpose --add_model`` puts user models);
3. a built-in CPSAM name missing there (:data:`BUILTIN`) is downloaded into that folder from
   Cellpose's address (``$ZSEG_MODEL_URL`` replaces it, e.g. a mirror), written to a
   temporary name and renamed, so a killed download leaves nothing half-written.

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
import uuid
from pathlib import Path

import torch

from zseg.engine.cpsam import CPSAMNet, cpsam_from_state_dict, describe_state_dict
from zseg.errors import UserError

log = logging.getLogger(__name__)

#: Built-in names zseg can download (CPSAM networks; Cellpose 4.2's default is cpsam_v2).
BUILTIN = ("cpsam", "cpsam_v2")
#: Cellpose 4.2 models on the DINOv3 backbone, which zseg does not run.
DINO = ("cpdino", "cpdino-vitb")
#: Where Cellpose 4.2 downloads its models from.
CELLPOSE_URL = "https://huggingface.co/mouseland/cellpose-sam/resolve/main/"
DOWNLOAD_TIMEOUT = 60  # seconds without data before a download is given up

_NETWORKS: dict[tuple, CPSAMNet] = {}


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
    if text in DINO:
        raise UserError(
            f"--model {text!r} is a Cellpose DINOv3 network, which zseg does not run; use cpsam or cpsam_v2."
        )
    if text not in BUILTIN:
        raise UserError(
            f"--model {text!r} is neither a file nor a model in {model_dir()}; give a built-in name "
            f"({', '.join(BUILTIN)}) or the path to your weights."
        )
    if not download:
        raise UserError(f"model {text!r} is not in {model_dir()}; {_where_to_put(text)}.")
    return _download(text)


def _download(name: str) -> Path:
    base = os.environ.get("ZSEG_MODEL_URL") or CELLPOSE_URL
    url = base.rstrip("/") + "/" + name
    target = model_dir() / name
    tmp = target.with_name(f".{name}.{uuid.uuid4().hex[:8]}.partial")
    log.warning("model %s is not in %s: downloading it from %s", name, model_dir(), url)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 22):
                f.write(chunk)
        os.replace(tmp, target)
    except (OSError, urllib.error.URLError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"model {name!r} is not in {model_dir()} and could not be downloaded from {url} ({reason}); "
            f"{_where_to_put(name)}."
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _state_dict(path: Path, *, mmap: bool) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # not a torch file, truncated, or pickled objects weights_only refuses
        raise UserError(
            f"--model {str(path)!r} is not a readable Cellpose weights file ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else 'unreadable'}); give a cpsam/cpsam_v2 checkpoint."
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"--model {str(path)!r} does not hold a state dict of tensors; give a cpsam/cpsam_v2 checkpoint.")
    return sd


def _describe(path: Path, sd: dict) -> dict:
    try:
        return describe_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
    except ValueError as e:
        cp3 = "W2" not in sd and "module.W2" not in sd
        hint = (" It looks like a Cellpose 3 (CPnet) model such as cyto3 or nuclei, which Cellpose 4 cannot run"
                if cp3 else "")
        raise UserError(f"--model {str(path)!r}: {e}.{hint} Give a cpsam/cpsam_v2 checkpoint.") from None


def inspect_model(model: str, *, download: bool = True) -> dict:
    """Resolve ``model`` and read its network sizes without loading the weights.

    Returns
    -------
    dict
        ``name`` (as given), ``path``, ``bytes``, ``bsize`` (tile size) and ``network`` (the
        sizes of :func:`zseg.engine.cpsam.describe_state_dict`).
    """
    path = resolve_model(model, download=download)
    sizes = _describe(path, _state_dict(path, mmap=True))
    return {
        "name": str(model), "path": str(path), "bytes": path.stat().st_size,
        "bsize": sizes["tokens"] * sizes["ps"], "network": sizes,
    }


def load_network(path: str | Path, device: torch.device, *, use_bfloat16: bool = True) -> CPSAMNet:
    """The network of the weights at ``path`` on ``device`` (bfloat16 weights by default, as
    Cellpose 4 runs them); built once per process and reused."""
    path = Path(path)
    key = (str(path.resolve()), str(device), use_bfloat16)
    if key not in _NETWORKS:
        sd = _state_dict(path, mmap=False)
        _describe(path, sd)
        try:
            net = cpsam_from_state_dict(sd)
        except ValueError as e:
            raise UserError(f"--model {str(path)!r}: {e}; give an unmodified cpsam/cpsam_v2 checkpoint.") from None
        del sd
        net = net.to(device=device, dtype=torch.bfloat16 if use_bfloat16 else torch.float32).eval()
        log.info("loaded %s (%d blocks) on %s in %s", path, net.depth, device, net.dtype)
        _NETWORKS.clear()  # one network per process: a new one replaces the last
        _NETWORKS[key] = net
    return _NETWORKS[key]


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
