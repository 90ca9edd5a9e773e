"""The Cellpose 3 network (``CPnet``: cyto, cyto2, cyto3, nuclei and models trained from them),
built to the shape of a state dict.

Architecture
------------
A U-Net of residual blocks on ``nbase = [C, n1, n2, ..., nk]`` channels (Cellpose 3's built-in
models: ``[2, 32, 64, 128, 256]``), all convolutions 3x3 (1x1 for projections and the output)
in *pre-activation* order: batch norm, ReLU, convolution.

* **Encoder**: level ``i`` (``downsample.down.res_down_i``) maps ``nbase[i] -> nbase[i+1]``
  channels with two residual pairs of convolutions; the first pair's shortcut is a batch norm +
  1x1 convolution (``proj``). Levels after the first start with a 2x2 max pool.
* **Style**: the deepest features averaged over the tile, divided by their L2 norm: a vector
  of ``nk`` values that every decoder block adds (through a linear layer) before its last three
  convolutions.
* **Decoder**: levels ``upsample.up.res_up_j`` map ``up[j+1] -> up[j]`` channels where
  ``up = [n1, ..., nk, nk]``; the deepest one runs on the deepest features, each next one on the
  nearest-neighbour 2x upsampled result, with the encoder's features of its level added to the
  input of its second convolution (skip connection).
* **Output**: batch norm, ReLU, 1x1 convolution to ``nout`` channels (3: the flow along the
  tile's first axis, along its second axis, and the cell-probability logit).

``diam_mean`` (the diameter the network was trained at: 30 for cyto*, 17 for nuclei) and
``diam_labels`` (the mean diameter of the training labels) are stored as one-element
parameters. Names of all tensors are those Cellpose 3 saves, so a checkpoint loads strictly.

Only evaluation is supported (batch norms use their running statistics). For a tile ``x`` of
shape ``(B, C, H, W)`` with H and W multiples of ``2 ** (len(nbase) - 2)``, :class:`CP3Net`
returns ``(B, nout, H, W)`` and the style vector ``(B, nk)``. Input channels follow Cellpose 3:
channel 0 the cytoplasm (or nuclei for a nucleus model), channel 1 the optional nucleus
channel; an input with fewer channels than the network's gets zero channels, as Cellpose 3
gives a grayscale image.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CP3Net", "cp3_from_state_dict", "describe_cp3_state_dict", "is_cp3_state_dict"]

_BN_EPS = 1e-5
_DOWN = re.compile(r"^downsample\.down\.res_down_(\d+)\.")
_UP = re.compile(r"^upsample\.up\.res_up_(\d+)\.")


def _norm_act_conv(cin: int, cout: int, k: int, *, act: bool = True) -> nn.Sequential:
    """Batch norm, (ReLU), ``k x k`` convolution with 'same' padding; saved as ``0.*`` and
    ``1.*`` (no ReLU) or ``0.*`` and ``2.*`` (with ReLU)."""
    layers = [nn.BatchNorm2d(cin, eps=_BN_EPS)]
    if act:
        layers.append(nn.ReLU())
    layers.append(nn.Conv2d(cin, cout, k, padding=k // 2))
    return nn.Sequential(*layers)


class _StyledConv(nn.Module):
    """A pre-activation convolution whose input first gets the style (through ``full``)."""

    def __init__(self, cin: int, cout: int, nstyle: int):
        super().__init__()
        self.conv = _norm_act_conv(cin, cout, 3)
        self.full = nn.Linear(nstyle, cout)

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + skip
        return self.conv(x + self.full(style)[:, :, None, None])


class _EncoderLevel(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = _norm_act_conv(cin, cout, 1, act=False)
        self.conv = nn.Sequential()
        for t in range(4):
            self.conv.add_module(f"conv_{t}", _norm_act_conv(cin if t == 0 else cout, cout, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        h = self.proj(x) + c[1](c[0](x))
        return h + c[3](c[2](h))


class _DecoderLevel(nn.Module):
    def __init__(self, cin: int, cout: int, nstyle: int):
        super().__init__()
        self.conv = nn.Sequential()
        self.conv.add_module("conv_0", _norm_act_conv(cin, cout, 3))
        for t in (1, 2, 3):
            self.conv.add_module(f"conv_{t}", _StyledConv(cout, cout, nstyle))
        self.proj = _norm_act_conv(cin, cout, 1, act=False)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        c = self.conv
        h = self.proj(x) + c[1](c[0](x), style, skip)
        return h + c[3](c[2](h, style), style)


class _Encoder(nn.Module):
    def __init__(self, nbase: list[int]):
        super().__init__()
        self.down = nn.Sequential()
        for i in range(len(nbase) - 1):
            self.down.add_module(f"res_down_{i}", _EncoderLevel(nbase[i], nbase[i + 1]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, level in enumerate(self.down):
            x = level(F.max_pool2d(x, 2, 2) if i else x)
            feats.append(x)
        return feats


class _Decoder(nn.Module):
    def __init__(self, up: list[int]):
        super().__init__()
        self.up = nn.Sequential()
        for j in range(len(up) - 1):
            self.up.add_module(f"res_up_{j}", _DecoderLevel(up[j + 1], up[j], up[-1]))

    def forward(self, feats: list[torch.Tensor], style: torch.Tensor) -> torch.Tensor:
        levels = list(self.up)
        x = levels[-1](feats[-1], feats[-1], style)
        for j in range(len(levels) - 2, -1, -1):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = levels[j](x, feats[j], style)
        return x


class CP3Net(nn.Module):
    """Cellpose 3's residual U-Net with a style vector (see the module docstring).

    Parameters
    ----------
    nbase : list of int
        Input channels, then the channels of each encoder level.
    nout : int
        Output channels (3).
    diam_mean : float
        Stored as ``diam_mean`` and ``diam_labels`` (a loaded state dict sets both).
    """

    bsize = 224
    family = "cp3"

    def __init__(self, nbase, nout: int = 3, diam_mean: float = 30.0):
        super().__init__()
        self.nbase = [int(n) for n in nbase]
        if len(self.nbase) < 3:
            raise ValueError(f"nbase {self.nbase} needs the input channels and at least two levels")
        up = self.nbase[1:] + [self.nbase[-1]]
        self.downsample = _Encoder(self.nbase)
        self.upsample = _Decoder(up)
        self.output = _norm_act_conv(up[0], nout, 1)
        self.diam_mean = nn.Parameter(torch.full((1,), float(diam_mean)), requires_grad=False)
        self.diam_labels = nn.Parameter(torch.full((1,), float(diam_mean)), requires_grad=False)
        self.nout = nout

    @property
    def nchan(self) -> int:
        return self.nbase[0]

    @property
    def device(self) -> torch.device:
        return self.output[2].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.output[2].weight.dtype

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[1] < self.nchan:  # Cellpose 3's channels: a missing nucleus channel is zeros
            x = F.pad(x, (0, 0, 0, 0, 0, self.nchan - x.shape[1]))
        elif x.shape[1] > self.nchan:
            raise ValueError(f"the network takes {self.nchan} channels, the input has {x.shape[1]}")
        feats = self.downsample(x)
        deep = feats[-1]
        style = deep.mean(dim=(2, 3))
        style = style / torch.sqrt(torch.sum(style * style, dim=1, keepdim=True))
        y = self.output(self.upsample(feats, style))
        return y, style


def is_cp3_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``sd`` looks like a Cellpose 3 network (whatever its sizes)."""
    keys = [k.removeprefix("module.") for k in sd]
    return "output.2.weight" in keys or any(_DOWN.match(k) for k in keys)


def describe_cp3_state_dict(sd: Mapping[str, torch.Tensor]) -> dict:
    """``nbase``, ``nout``, ``diam_mean``, ``diam_labels`` of a CP3 state dict; ``ValueError``
    when any tensor is missing, extra or misshaped (checked against the network of those
    sizes, so a file is checked before its weights are loaded)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if not is_cp3_state_dict(sd):
        raise ValueError("not a Cellpose 3 network (no downsample.down.res_down_* / output.2.weight tensors)")
    if "output.2.weight" not in sd or not any(_DOWN.match(k) for k in sd):
        raise ValueError("it is incomplete (it lacks output.2.weight or the encoder's tensors)")
    levels = sorted({int(m.group(1)) for k in sd if (m := _DOWN.match(k))})
    if levels != list(range(len(levels))):
        raise ValueError(f"encoder levels {levels} are not numbered 0..{len(levels) - 1}")
    nbase = []
    for i in levels:
        w = sd.get(f"downsample.down.res_down_{i}.conv.conv_0.2.weight")
        if w is None or w.ndim != 4:
            raise ValueError(f"missing or misshaped downsample.down.res_down_{i}.conv.conv_0.2.weight")
        if i == 0:
            nbase.append(int(w.shape[1]))
        nbase.append(int(w.shape[0]))
    out = sd["output.2.weight"]
    if out.ndim != 4:
        raise ValueError(f"output.2.weight has shape {tuple(out.shape)}: not a 2D-convolution network "
                         "(zseg does not run Cellpose 3's 3D-convolution networks)")

    def scalar(name):
        t = sd.get(name)
        if t is None or t.numel() != 1:
            raise ValueError(f"missing or misshaped {name} (a one-element tensor)")
        return float(t.float().reshape(()))

    sizes = {"family": "cp3", "nbase": nbase, "nout": int(out.shape[0]),
             "diam_mean": scalar("diam_mean"), "diam_labels": scalar("diam_labels")}
    with torch.device("meta"):  # every tensor's name and shape, without allocating weights
        want = {k: tuple(v.shape) for k, v in CP3Net(nbase, sizes["nout"]).state_dict().items()}
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    wrong = sorted(k for k in set(want) & set(sd) if tuple(sd[k].shape) != want[k])
    for what, keys in (("lacks", missing), ("has unexpected", extra), ("has misshaped", wrong)):
        if keys:
            more = f" and {len(keys) - 2} more" if len(keys) > 2 else ""
            raise ValueError(f"it {what} tensors for nbase {nbase}: {', '.join(keys[:2])}{more}")
    return sizes


def cp3_from_state_dict(sd: Mapping[str, torch.Tensor]) -> CP3Net:
    """A :class:`CP3Net` of the sizes of ``sd`` with its weights, loaded strictly (every
    tensor present, none left over, all shapes equal); ``ValueError`` otherwise."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    sizes = describe_cp3_state_dict(sd)
    net = CP3Net(sizes["nbase"], sizes["nout"], diam_mean=sizes["diam_mean"])
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = [line.strip() for line in str(e).splitlines() if line.strip()][1:2]
        raise ValueError(f"the state dict does not fit a Cellpose 3 network of nbase {sizes['nbase']}"
                         f" ({first[0][:200] if first else 'mismatch'})") from None
    return net.eval()
