"""Networks and volumes for the predict tests (the Cellpose reference is :mod:`zseg.engine.cellpose_ref`).

No Cellpose weights can be downloaded here, so the tests build CPSAM networks themselves:

- :func:`random_cpsam` -- random weights (Cellpose's own tests do the same), narrow so that a
  tile costs milliseconds on a CPU; its flows are arbitrary but deterministic, which is all
  a flow-equality test needs.
- :func:`gradient_cpsam` -- a CPSAM state dict whose weights are *set by hand* so that the
  network computes a meaningful Cellpose output for bright blobs: flows = the gradient of
  the Gaussian-smoothed image (pointing to each blob's centre), cellprob = smoothed image
  minus a threshold. Masks made from these flows are real cells, so comparing zseg's and
  Cellpose's masks measures something.

How :func:`gradient_cpsam` works, with the tile cut into 8x8-pixel tokens: the patch
embedding copies a token's 64 pixels into 64 channels and adds a channel holding minus their
sum and two channels holding +K and -K (K = 1e4). The transformer block is the identity
(attention and MLP outputs weighted 0). The neck's layer norms divide by the channels'
standard deviation, which the +-K channels dominate (the channels sum to zero, so the mean
is 0): they become multiplications by a constant, up to a relative error of
~sum(pixels^2) / K^2 < 1e-4. The neck's 3x3 convolution sees the 3x3 neighbouring tokens, so
it can compute any linear filter of radius <= 8 pixels for each of the 64 pixels of its token:
here a Gaussian (sigma 2) for cellprob and its derivatives for the flows; the readout undoes
the layer norms' constant. It only works in float32 (bfloat16 would lose the pixels next to K).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage as ndi

from zseg.engine.cpsam import CPSAMNet, cpsam_from_state_dict, cpsam_state_dict

TINY = dict(dim=32, depth=1, heads=2, neck=32)


def random_cpsam(bsize: int = 64, seed: int = 1, **sizes) -> dict[str, torch.Tensor]:
    """A narrow 1-block CPSAM state dict with random weights and ``bsize`` tiles."""
    return cpsam_state_dict(bsize=bsize, seed=seed, **{**TINY, **sizes})


def gradient_cpsam(bsize: int = 64, *, sigma: float = 2.0, flow_gain: float = 12.0, prob_gain: float = 10.0,
                   prob_offset: float = 2.0, radius: int = 8) -> dict[str, torch.Tensor]:
    """A CPSAM state dict computing ``flow = flow_gain * grad(G * x)`` and
    ``cellprob = prob_gain * (G * x) - prob_offset`` per tile (G: Gaussian of ``sigma``, radius 8)."""
    ps, k_big = 8, 1e4
    npix = ps * ps
    dim = npix + 3  # pixels, minus their sum, +K, -K
    nout = 3
    neck = nout * npix + 3  # outputs, minus their sum, +K2, -K2
    sd = cpsam_state_dict(dim=dim, depth=1, heads=1, mlp_dim=4, neck=neck, bsize=bsize, seed=0)
    sd = {k: torch.zeros_like(v) for k, v in sd.items()}
    sd["W2"] = torch.eye(nout * npix).reshape(nout * npix, nout, ps, ps)
    sd["diam_labels"] = sd["diam_mean"] = torch.tensor([30.0])
    for n in ("norm1", "norm2"):
        sd[f"encoder.blocks.0.{n}.weight"] = torch.ones(dim)
    sd["encoder.neck.1.weight"] = torch.ones(neck)
    sd["encoder.neck.3.weight"] = torch.ones(neck)

    pe = torch.zeros(dim, 3, ps, ps)
    pb = torch.zeros(dim)
    for i in range(npix):
        pe[i, 0, i // ps, i % ps] = 1.0
    pe[npix, 0] = -1.0
    pb[npix + 1], pb[npix + 2] = k_big, -k_big
    sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"] = pe, pb

    n0 = torch.zeros(neck, dim, 1, 1)
    n0[:dim, :, 0, 0] = torch.eye(dim)
    sd["encoder.neck.0.weight"] = n0
    s1 = (neck / 2) ** 0.5 / k_big  # what the first layer norm multiplies by

    d = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * sigma**2))
    g /= g.sum()
    kernels = [  # correlation kernels k(dy, dx): output(y) = sum k(d) x(y + d)
        flow_gain * d[:, None] / sigma**2 * g,   # flow along the tile's first axis
        flow_gain * d[None, :] / sigma**2 * g,   # ... and its second axis
        prob_gain * g,                           # cellprob (before the offset)
    ]
    n2 = torch.zeros(neck, neck, 3, 3, dtype=torch.float64)
    for o, k in enumerate(kernels):
        for u in range(ps):
            for v in range(ps):
                j = o * npix + u * ps + v
                for ty in (-1, 0, 1):
                    for tx in (-1, 0, 1):
                        for up in range(ps):
                            for vp in range(ps):
                                dy, dx = ps * ty + up - u, ps * tx + vp - v
                                if abs(dy) <= radius and abs(dx) <= radius:
                                    n2[j, up * ps + vp, ty + 1, tx + 1] = k[dy + radius, dx + radius] / s1
    n2[nout * npix] = -n2[: nout * npix].sum(0)
    k2 = 1e4
    const_in = (k_big * s1)  # the +K channel after the first layer norm
    n2[nout * npix + 1, npix + 1, 1, 1] = k2 / const_in
    n2[nout * npix + 2, npix + 1, 1, 1] = -k2 / const_in
    sd["encoder.neck.2.weight"] = n2.float()
    s2 = (neck / 2) ** 0.5 / k2
    ow = torch.zeros(nout * npix, neck, 1, 1)
    ow[:, : nout * npix, 0, 0] = torch.eye(nout * npix) / s2
    ob = torch.zeros(nout * npix)
    ob[2 * npix:] = -prob_offset
    sd["out.weight"], sd["out.bias"] = ow, ob
    return sd


def blobs(shape, *, spacing: float = 12.0, sigma: float = 2.5, seed: int = 0, noise: float = 0.02) -> np.ndarray:
    """Bright Gaussian blobs on a jittered grid (nucleus-like), uint16."""
    rng = np.random.default_rng(seed)
    axes = [np.arange(spacing / 2, s, spacing) for s in shape]
    centres = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    centres += rng.uniform(-spacing / 6, spacing / 6, centres.shape)
    img = np.zeros(shape, np.float64)
    img[tuple(np.clip(np.round(centres).astype(int), 0, np.array(shape) - 1).T)] = 1.0
    img = ndi.gaussian_filter(img, sigma) * (2 * np.pi * sigma**2) ** 1.5
    img = img / img.max() + noise * rng.standard_normal(shape)
    return np.clip(img * 20000 + 500, 0, 65535).astype(np.uint16)


def load(sd) -> CPSAMNet:
    return cpsam_from_state_dict(sd)
