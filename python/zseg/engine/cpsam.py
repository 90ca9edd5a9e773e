"""The CPSAM network (Cellpose 4), built to the shape of a state dict.

CPSAM is SAM's ViT image encoder run on 8x8-pixel tokens of a 256x256 tile with global
attention in every block, followed by a 1x1 convolution that predicts ``nout`` values for each
of the 64 pixels of a token; a fixed transposed convolution (``W2``) puts them back in place.
For a tile ``x`` of shape ``(B, C, 256, 256)`` (C <= 3 channels) it returns
``(B, 3, 256, 256)``: the flow along the tile's first axis, along its second axis, and the
cell-probability logit.

:func:`cpsam_from_state_dict` reads every size from the state dict itself: embedding width,
heads (from the relative-position tables), MLP width, depth (the number of blocks present),
token size, tile size and output channels. A checkpoint of Cellpose's ``cpsam``/``cpsam_v2``
therefore loads into the full ViT-L network, and a state dict with fewer (or narrower)
blocks loads into a smaller one: tests build such networks with random weights. Loading is
strict: a missing, extra or misshaped tensor is an error, never silently ignored.

The modules are written here (state-dict names as Cellpose saves them) rather than taken from
``segment_anything``: importing that package costs seconds (torchvision), and attention runs
through ``torch.nn.functional.scaled_dot_product_attention`` with the relative positions as
an additive bias, which uses a fused kernel where the device has one. The result equals
Cellpose's ``vit.CPSAM`` to float32 rounding (a test compares them on the same weights).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CPSAMNet", "cpsam_from_state_dict", "cpsam_state_dict", "describe_state_dict"]

_BLOCK = re.compile(r"^encoder\.blocks\.(\d+)\.")
_SAM_GLOBAL = (5, 11, 17, 23)  # SAM ViT-L blocks with global attention (larger rel-pos tables)
_REQUIRED = (
    "W2", "encoder.pos_embed", "encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias",
    "encoder.neck.0.weight", "encoder.neck.2.weight", "out.weight", "out.bias",
)


class LayerNorm2d(nn.Module):
    """Layer norm over the channels of a ``(B, C, H, W)`` map (SAM's neck)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - mean) / torch.sqrt(var + self.eps)) + self.bias[:, None, None]


def _relative_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """``(size, size, C)``: the learned relative-position vector of each (query, key) pair
    along one axis of a ``size``-token grid; the stored table is linearly resampled to the
    ``2 * size - 1`` offsets when its length differs (CPSAM's tables were learnt for SAM's
    64- and 14-token grids)."""
    n = 2 * size - 1
    if table.shape[0] != n:
        table = F.interpolate(table.T[None], size=n, mode="linear")[0].T
    offsets = torch.arange(size, device=table.device)
    return table[offsets[:, None] - offsets[None, :] + size - 1]


class Attention(nn.Module):
    """Global multi-head self-attention over a token grid with decomposed relative positions:
    the score of query ``(i, j)`` and key ``(k, l)`` gets ``q . Rh[i - k] + q . Rw[j - l]``."""

    def __init__(self, dim: int, heads: int, rel_pos: int):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, dim = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, HW, head_dim)
        rh = _relative_table(self.rel_pos_h, h)  # (H, H, head_dim)
        rw = _relative_table(self.rel_pos_w, w)
        grid_q = q.reshape(b, self.heads, h, w, -1)
        bias_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rh)
        bias_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rw)
        bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, self.heads, h * w, h * w)
        # softmax(q k^T / sqrt(d) + bias) v, fused where the device has a kernel for it
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (B, heads, HW, head_dim)
        return self.proj(out.permute(0, 2, 1, 3).reshape(b, h, w, dim))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm1(x))``, then ``+ mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, rel_pos: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, rel_pos)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _MLP(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Encoder(nn.Module):
    """The parts of SAM's ``ImageEncoderViT`` that CPSAM uses, under the same names."""

    def __init__(self, dim: int, ps: int, tokens: int, neck: int, blocks: list[nn.Module], in_chans: int = 3):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, dim, kernel_size=ps, stride=ps)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, tokens, dim))
        self.blocks = nn.ModuleList(blocks)
        self.neck = nn.Sequential(
            nn.Conv2d(dim, neck, kernel_size=1, bias=False),
            LayerNorm2d(neck),
            nn.Conv2d(neck, neck, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(neck),
        )


class CPSAMNet(nn.Module):
    """CPSAM: tokens -> transformer blocks -> neck -> per-pixel readout.

    Use :func:`cpsam_from_state_dict` to build one; the constructor takes the sizes.

    Attributes
    ----------
    bsize : int
        Tile size the position embedding was trained for (256 for Cellpose's models).
    ps : int
        Token size in pixels (8).
    nout : int
        Output channels (3).
    """

    def __init__(self, *, dim: int, depth: int, heads: int, mlp_dim: int, neck: int, ps: int, tokens: int,
                 nout: int, rel_pos: list[int], in_chans: int = 3):
        super().__init__()
        blocks = [Block(dim, heads, mlp_dim, r) for r in rel_pos]
        self.encoder = _Encoder(dim, ps, tokens, neck, blocks, in_chans)
        self.out = nn.Conv2d(neck, nout * ps * ps, kernel_size=1)
        self.W2 = nn.Parameter(torch.eye(nout * ps * ps).reshape(nout * ps * ps, nout, ps, ps), requires_grad=False)
        self.diam_labels = nn.Parameter(torch.tensor([30.0]), requires_grad=False)
        self.diam_mean = nn.Parameter(torch.tensor([30.0]), requires_grad=False)
        self.ps, self.nout, self.bsize, self.depth = ps, nout, tokens * ps, depth

    @property
    def device(self) -> torch.device:
        return self.W2.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W2.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, bsize, bsize)`` -> ``(B, nout, bsize, bsize)``; C may be fewer than 3 channels."""
        proj = self.encoder.patch_embed.proj
        t = F.conv2d(x, proj.weight[:, : x.shape[1]], proj.bias, stride=self.ps)
        t = t.permute(0, 2, 3, 1) + self.encoder.pos_embed
        for block in self.encoder.blocks:
            t = block(t)
        t = self.encoder.neck(t.permute(0, 3, 1, 2))
        return F.conv_transpose2d(self.out(t), self.W2, stride=self.ps)


def describe_state_dict(sd: Mapping[str, torch.Tensor]) -> dict:
    """The network sizes a CPSAM state dict implies; ``ValueError`` saying what is missing otherwise."""
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise ValueError(f"not a CPSAM state dict: no {', '.join(missing[:3])}")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK.match(k))), default=-1)
    if depth == 0:
        raise ValueError("not a CPSAM state dict: it has no encoder.blocks")
    present = sorted({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))})
    if present != list(range(depth)):
        raise ValueError(f"CPSAM state dict has blocks {present}: they must be numbered 0..{depth - 1}")
    pw = sd["encoder.patch_embed.proj.weight"]
    dim, in_chans, ps = int(pw.shape[0]), int(pw.shape[1]), int(pw.shape[2])
    tokens = int(sd["encoder.pos_embed"].shape[1])
    head_dim = int(sd["encoder.blocks.0.attn.rel_pos_h"].shape[1])
    if dim % head_dim:
        raise ValueError(f"CPSAM state dict: width {dim} is not a multiple of the head width {head_dim}")
    rel = [(int(sd[f"encoder.blocks.{i}.attn.rel_pos_h"].shape[0]) + 1) // 2 for i in range(depth)]
    w2 = sd["W2"]
    return {
        "dim": dim, "depth": depth, "heads": dim // head_dim, "mlp_dim": int(sd["encoder.blocks.0.mlp.lin1.weight"].shape[0]),
        "neck": int(sd["encoder.neck.0.weight"].shape[0]), "ps": ps, "tokens": tokens, "nout": int(w2.shape[1]),
        "rel_pos": rel, "in_chans": in_chans,
    }


def cpsam_from_state_dict(sd: Mapping[str, torch.Tensor]) -> CPSAMNet:
    """A :class:`CPSAMNet` with the sizes and weights of ``sd`` (float32, on the CPU).

    A ``module.`` prefix (saved from ``DataParallel``) is removed. Raises ``ValueError`` when
    ``sd`` is not a CPSAM state dict or a tensor is missing, extra or of another shape.
    """
    if any(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    sizes = describe_state_dict(sd)
    with torch.device("meta"):
        net = CPSAMNet(**sizes)
    net = net.to_empty(device="cpu")
    try:
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        first = str(e).replace("\n", " ").replace("\t", "")[:300]
        raise ValueError(f"CPSAM state dict does not match the network it describes: {first}") from None
    return net.eval()


def cpsam_state_dict(*, dim: int = 1024, depth: int = 1, heads: int = 16, mlp_dim: int | None = None,
                     neck: int = 256, ps: int = 8, bsize: int = 256, nout: int = 3, seed: int = 0,
                     ) -> dict[str, torch.Tensor]:
    """A CPSAM state dict with random weights (for tests and benchmarks; no weights can be downloaded).

    The defaults are Cellpose's CPSAM sizes with ``depth`` blocks (Cellpose's own tests use 2
    of its 24); ``dim``, ``heads``, ``mlp_dim`` and ``neck`` make narrower networks. The
    relative-position tables have SAM ViT-L's sizes (27 rows; 127 in blocks 5, 11, 17, 23).
    """
    g = torch.Generator().manual_seed(seed)
    mlp_dim = mlp_dim or 4 * dim
    with torch.device("meta"):
        net = CPSAMNet(dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim, neck=neck, ps=ps, tokens=bsize // ps,
                       nout=nout, rel_pos=[64 if i in _SAM_GLOBAL else 14 for i in range(depth)])
    sd = {}
    for k, v in net.state_dict().items():
        if k == "W2":
            sd[k] = torch.eye(nout * ps * ps).reshape(nout * ps * ps, nout, ps, ps)
        elif k in ("diam_labels", "diam_mean"):
            sd[k] = torch.tensor([30.0])
        elif k.endswith("norm1.weight") or k.endswith("norm2.weight") or re.search(r"neck\.[13]\.weight$", k):
            sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            fan_in = max(1, v[0].numel()) if v.ndim > 1 else 1
            sd[k] = torch.randn(v.shape, generator=g) / fan_in**0.5 * (0.02 if v.ndim == 1 else 1.0)
    return sd
