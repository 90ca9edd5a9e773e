"""Exact global percentiles from mergeable per-chunk histograms.

The ``percentiles`` phase histograms every chunk (:func:`histogram`), sums the histograms
(:func:`merge`) and reads percentiles off the sum (:func:`percentile`). A histogram maps an
integer *key* to a voxel count; keys are an order-preserving encoding of the voxel values, so
the sorted sample that ``numpy.percentile`` would partition can be walked through the
cumulative counts without ever holding the volume.

Interpolation
-------------
:func:`percentile` replicates ``numpy.percentile(values, q)`` with its default method
``"linear"`` (Hyndman & Fan 1996, type 7): virtual index ``(n - 1) * q / 100``, neighbours
``floor`` and ``floor + 1`` clipped to ``n - 1``, and numpy's two-sided ``_lerp``
(``a + (b - a) * t`` for ``t < 0.5``, ``b - (b - a) * (1 - t)`` otherwise), with the same
operand dtypes. The result is therefore *bit for bit* equal to
``numpy.percentile(values, np.asarray(q, float64))`` whenever the histogram is exact (a zero
result may be ``+0.0`` where numpy gives ``-0.0``; the two compare equal):

* ``uint8``, ``uint16``, ``uint32``, ``int8``, ``int16``, ``int32``: the key is the value
  (offset by ``2**(bits-1)`` for signed types); exact.
* ``float16``: the key is the whole 16-bit pattern with the usual sign flip; exact (``-0.0``
  counts as ``+0.0``, which compares equal).

Float error bound
-----------------
``float32`` keeps the top :data:`FLOAT32_KEY_BITS` = 20 bits of the sign-flipped bit pattern
(sign, 8 exponent bits and the top :data:`FLOAT32_MANTISSA_BITS` = 11 mantissa bits), so a
histogram has at most 2**20 bins. A key decodes to the edge of its bin *nearest zero*, i.e.
each voxel counts as its value with the mantissa truncated to 11 bits (:func:`quantize`).
Then ``percentile(histogram(v), q) == numpy.percentile(quantize(v), q)`` exactly, and against
the unbinned values, for each ``q``::

    |p_hist - p_numpy| <= 2**-11 * max(|x_j|, |x_j+1|) + 2**-137

where ``x_j <= x_j+1`` are the two order statistics numpy interpolates between (so the
relative error is at most 2**-11 ~ 4.9e-4; the 2**-137 term only matters for subnormals),
plus the rounding of the interpolation itself (a few float32 ulps of ``x_j+1 - x_j``).
Zero and every float32 whose mantissa fits in 11 bits (e.g. all integers up to 4096) are
represented exactly. ``float64`` input is rounded to float32 first (values beyond the float32
range are refused), which adds at most 2**-24 relative: the bound becomes
``(2**-11 + 2**-23) * max(|x_j|, |x_j+1|) + 2**-136``.

NaN and inf are refused (``ValueError``): percentiles of an image with
non-finite voxels are not meaningful, and the count tells the user how many to fix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "FLOAT32_KEY_BITS",
    "FLOAT32_MANTISSA_BITS",
    "SUPPORTED_DTYPES",
    "Histogram",
    "histogram",
    "merge",
    "percentile",
    "percentile_float32",
    "quantize",
]

#: Input dtypes :func:`histogram` accepts.
SUPPORTED_DTYPES = (
    "uint8", "uint16", "uint32", "int8", "int16", "int32", "float16", "float32", "float64",
)
#: Bits of the sign-flipped float32 pattern kept as the key (float32 and float64 input).
FLOAT32_KEY_BITS = 20
#: Mantissa bits kept for float32/float64 (relative error of a binned value < 2**-this).
FLOAT32_MANTISSA_BITS = FLOAT32_KEY_BITS - 9
_FLOAT32_DROP = 32 - FLOAT32_KEY_BITS

# Number of bits of the key for each dtype (keys lie in [0, 2**bits)).
_KEY_BITS = {
    "uint8": 8, "int8": 8, "uint16": 16, "int16": 16, "float16": 16,
    "uint32": 32, "int32": 32, "float32": FLOAT32_KEY_BITS, "float64": FLOAT32_KEY_BITS,
}
# Voxels handled per step, to bound temporary memory (a few bytes per voxel of a block).
_BLOCK = 1 << 22


@dataclass(frozen=True)
class Histogram:
    """Voxel counts per key for one dtype; sums exactly across chunks (:func:`merge`).

    Attributes
    ----------
    dtype : str
        Name of the input dtype (one of :data:`SUPPORTED_DTYPES`); fixes the key encoding.
    keys : (K,) ndarray of uint64
        Sorted, unique, order-preserving encodings of the values present (see module notes).
    counts : (K,) ndarray of int64
        Number of voxels with each key, each > 0.
    """

    dtype: str
    keys: np.ndarray
    counts: np.ndarray

    def __post_init__(self):
        name = _dtype_name(self.dtype)
        keys = np.asarray(self.keys)
        counts = np.asarray(self.counts)
        if keys.ndim != 1 or counts.shape != keys.shape:
            raise ValueError(f"keys and counts must be 1-d of one length, got {keys.shape} and {counts.shape}")
        if keys.dtype != np.uint64 or counts.dtype != np.int64:
            raise ValueError(f"keys must be uint64 and counts int64, got {keys.dtype} and {counts.dtype}")
        if keys.size > 1 and not np.all(keys[1:] > keys[:-1]):
            raise ValueError("histogram keys must be sorted and unique")
        if keys.size and int(keys[-1]) >> _KEY_BITS[name]:
            raise ValueError(f"key {int(keys[-1])} is out of range for a {name} histogram")
        if counts.size and counts.min() < 0:
            raise ValueError("histogram counts must be non-negative")
        object.__setattr__(self, "dtype", name)

    @property
    def total(self) -> int:
        """Number of voxels counted."""
        return int(self.counts.sum())

    @classmethod
    def empty(cls, dtype: str | np.dtype) -> Histogram:
        """A histogram with no voxels (the neutral element of :func:`merge`)."""
        return cls(_dtype_name(dtype), np.zeros(0, np.uint64), np.zeros(0, np.int64))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for ``numpy.savez`` (no pickling needed): ``dtype``, ``key_bits``, ``keys``, ``counts``."""
        return {
            "dtype": np.array(self.dtype),
            "key_bits": np.array(_KEY_BITS[self.dtype], np.int64),
            "keys": self.keys,
            "counts": self.counts,
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Histogram:
        """Inverse of :meth:`to_arrays`; refuses histograms written with another key encoding."""
        dtype = _dtype_name(str(np.asarray(arrays["dtype"])[()]))
        if "key_bits" in arrays and int(np.asarray(arrays["key_bits"])) != _KEY_BITS[dtype]:
            raise ValueError(
                f"histogram was written with {int(np.asarray(arrays['key_bits']))}-bit keys, this version "
                f"uses {_KEY_BITS[dtype]} for {dtype}; recompute the histogram"
            )
        return cls(
            dtype,
            np.asarray(arrays["keys"]).astype(np.uint64, copy=False),
            np.asarray(arrays["counts"]).astype(np.int64, copy=False),
        )


def histogram(values: np.ndarray, *, exclude_zeros: bool = False) -> Histogram:
    """Count the voxels of ``values`` per key.

    Parameters
    ----------
    values : ndarray, any shape
        Intensities, dtype one of :data:`SUPPORTED_DTYPES`.
    exclude_zeros : bool
        Leave voxels equal to 0 (or ``-0.0``) out, e.g. the padding of a stitched volume.

    Returns
    -------
    Histogram
        Exact for integer dtypes and float16; float32/float64 values are binned to 11
        mantissa bits (see the module notes for the bound).

    Raises
    ------
    ValueError
        For an unsupported dtype, NaN/inf voxels, or float64 values beyond the float32 range.
    """
    a = np.asarray(values)
    name = _dtype_name(a.dtype)
    flat = a.reshape(-1)
    nbits = _KEY_BITS[name]
    nonfinite = 0
    if nbits <= FLOAT32_KEY_BITS:  # dense key space: bincount per block
        acc = np.zeros(1 << nbits, np.int64)
        for start in range(0, flat.size, _BLOCK):
            keys, bad = _block_keys(name, flat[start:start + _BLOCK], exclude_zeros)
            nonfinite += bad
            if keys.size:
                acc += np.bincount(keys, minlength=acc.size)
        _raise_nonfinite(name, nonfinite, flat.size)
        keys = np.flatnonzero(acc)
        hist = Histogram(name, keys.astype(np.uint64), acc[keys])
    else:  # 32-bit integers: sort per block, then merge
        parts = []
        for start in range(0, flat.size, _BLOCK):
            keys, _ = _block_keys(name, flat[start:start + _BLOCK], exclude_zeros)
            k, c = np.unique(keys, return_counts=True)
            parts.append(Histogram(name, k.astype(np.uint64), c.astype(np.int64)))
        hist = merge(parts) if parts else Histogram.empty(name)
    return hist


def merge(hists: Iterable[Histogram]) -> Histogram:
    """Sum histograms exactly (order independent).

    Parameters
    ----------
    hists : iterable of Histogram
        At least one; all of one dtype.

    Returns
    -------
    Histogram
        Counts per key summed over ``hists``.
    """
    hists = list(hists)
    if not hists:
        raise ValueError("merge needs at least one histogram (use Histogram.empty(dtype) as the start)")
    dtypes = sorted({h.dtype for h in hists})
    if len(dtypes) > 1:
        raise ValueError(f"cannot merge histograms of different dtypes: {dtypes}")
    if len(hists) == 1:
        return hists[0]
    keys = np.concatenate([h.keys for h in hists])
    counts = np.concatenate([h.counts for h in hists])
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    if keys.size == 0:
        return Histogram.empty(dtypes[0])
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    return Histogram(dtypes[0], keys[starts], np.add.reduceat(counts, starts).astype(np.int64))


def percentile(hist: Histogram, q: float | Sequence[float] | np.ndarray) -> np.ndarray:
    """Percentiles of the counted voxels, as ``numpy.percentile`` computes them.

    Parameters
    ----------
    hist : Histogram
        Usually the :func:`merge` of every chunk's histogram.
    q : float or sequence of float, in [0, 100]
        Percentiles (not fractions).

    Returns
    -------
    ndarray of float64, shape ``np.shape(q)``
        Equal bit for bit to ``numpy.percentile(values, np.asarray(q, np.float64))``
        (method ``"linear"``) for integer dtypes and float16; equal to it on
        :func:`quantize` ``(values)`` for float32/float64, which is within
        2**-11 relative of the exact value (module notes give the bound).

    Raises
    ------
    ValueError
        If the histogram is empty or ``q`` is outside [0, 100].
    """
    qa = np.asarray(q, dtype=np.float64)
    if qa.size and not (np.all(qa >= 0) and np.all(qa <= 100)):
        raise ValueError(f"percentiles {qa.tolist()} must lie in [0, 100]")
    n = hist.total
    if n == 0:
        raise ValueError(
            "no voxels to compute percentiles from"
        )
    # numpy: q = true_divide(q, 100); virtual index for "linear" = (n - 1) * q
    quantiles = np.true_divide(qa.reshape(-1), 100)
    virtual = (n - 1) * quantiles
    previous = np.floor(virtual)
    nxt = previous + 1
    above = virtual >= n - 1
    previous[above] = -1
    nxt[above] = -1
    below = virtual < 0
    previous[below] = 0
    nxt[below] = 0
    gamma = np.asarray(virtual - previous, dtype=virtual.dtype)
    a = _order_statistics(hist, previous.astype(np.int64) % n)
    b = _order_statistics(hist, nxt.astype(np.int64) % n)
    with np.errstate(over="ignore", invalid="ignore"):
        result = _lerp(a, b, gamma)
    return np.asarray(result, dtype=np.float64).reshape(qa.shape)


def percentile_float32(hist: Histogram, q: float) -> np.float32:
    """One percentile as Cellpose's ``normalize99`` gets it: ``numpy.percentile(values.astype(
    float32), q)`` with a Python float ``q`` (numpy then interpolates in float32).

    Bit for bit equal to it for integer dtypes and float16 (whose values float32 holds
    exactly); for float32/float64 on :func:`quantize` ``(values)``. Raises ``ValueError`` like
    :func:`percentile`.
    """
    q = float(q)
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} must lie in [0, 100]")
    n = hist.total
    if n == 0:
        raise ValueError("no voxels to compute percentiles from")
    virtual = (n - 1) * (q / 100)
    previous = math.floor(virtual)
    a = _order_statistics(hist, np.array([previous])).astype(np.float32)
    b = _order_statistics(hist, np.array([min(previous + 1, n - 1)])).astype(np.float32)
    return _lerp(a, b, float(virtual - previous))[0]  # a Python float weight keeps float32 arithmetic


def quantize(values: np.ndarray) -> np.ndarray:
    """The value each voxel counts as in a :func:`histogram`.

    Parameters
    ----------
    values : ndarray, any shape, dtype in :data:`SUPPORTED_DTYPES`

    Returns
    -------
    ndarray, same shape and dtype
        ``values`` itself (a copy) for integer dtypes and float16 (with ``-0.0`` as ``+0.0``);
        for float32 the value with its mantissa truncated to 11 bits (towards zero); for
        float64 the same after rounding to float32, returned as float64.
    """
    a = np.asarray(values)
    name = _dtype_name(a.dtype)
    if name not in ("float32", "float64"):
        out = a.copy()
        if name == "float16":
            out += np.float16(0)  # -0.0 -> +0.0
        return out
    with np.errstate(over="ignore"):
        f = np.ascontiguousarray(a, dtype=np.float32)
    u = f.view(np.uint32) & np.uint32(~((1 << _FLOAT32_DROP) - 1) & 0xFFFFFFFF)
    u[u == 0x80000000] = 0
    return u.view(np.float32).astype(a.dtype)


# ---------------------------------------------------------------------------------------------
# helpers


def _dtype_name(dtype) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in _KEY_BITS:
        raise ValueError(
            f"intensity dtype {name!r} is not supported for percentiles; supported: "
            f"{', '.join(SUPPORTED_DTYPES)}. Convert the input (e.g. to float32 or uint16)."
        )
    return name


def _raise_nonfinite(name: str, count: int, size: int) -> None:
    if count:
        raise ValueError(
            f"{count} of {size} voxels are NaN or infinite (or, for float64, beyond the float32 range "
            f"±3.4e38)"
        )


def _block_keys(name: str, block: np.ndarray, exclude_zeros: bool) -> tuple[np.ndarray, int]:
    """Keys of one block (dtype suitable for bincount / unique) and its count of non-finite voxels."""
    if name in ("uint8", "uint16", "uint32", "int8", "int16", "int32"):
        if exclude_zeros:
            block = block[block != 0]
        if name == "int8":
            return block.astype(np.int16) + 128, 0
        if name == "int16":
            return block.astype(np.int32) + 32768, 0
        if name == "int32":
            return block.astype(np.int64) + (1 << 31), 0
        return block, 0
    if name == "float16":
        u = np.ascontiguousarray(block).view(np.uint16)
        bad = int(np.count_nonzero((u & 0x7C00) == 0x7C00))
        if exclude_zeros:
            u = u[(u & 0x7FFF) != 0]
        u = np.where(u == 0x8000, np.uint16(0), u)
        flip = np.where(u >> 15 != 0, np.uint16(0xFFFF), np.uint16(0x8000))
        return u ^ flip, bad
    # float32, float64 -> float32 pattern, top 20 bits
    if name == "float64":
        with np.errstate(over="ignore"):
            f = block.astype(np.float32)  # NaN, inf and |x| > 3.4e38 all become non-finite
        bad = int(f.size - np.count_nonzero(np.isfinite(f)))
        if exclude_zeros:
            f = f[block != 0]
        u = f.view(np.uint32)
    else:
        u = np.ascontiguousarray(block).view(np.uint32)
        bad = int(np.count_nonzero((u & 0x7F800000) == 0x7F800000))
        if exclude_zeros:
            u = u[(u & 0x7FFFFFFF) != 0]
    u = np.where(u == 0x80000000, np.uint32(0), u)
    flip = np.where(u >> 31 != 0, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
    return ((u ^ flip) >> _FLOAT32_DROP).astype(np.intp), bad


def _decode(name: str, keys: np.ndarray) -> np.ndarray:
    """Values (in the histogram's dtype) that ``keys`` stand for."""
    keys = np.asarray(keys, dtype=np.uint64)
    if name.startswith("uint"):
        return keys.astype(name)
    if name.startswith("int"):
        return (keys.astype(np.int64) - (1 << (np.dtype(name).itemsize * 8 - 1))).astype(name)
    if name == "float16":
        k = keys.astype(np.uint16)
        raw = np.where(k >> 15 != 0, k ^ np.uint16(0x8000), ~k)
        return raw.astype(np.uint16).view(np.float16)
    k = keys.astype(np.uint32) << np.uint32(_FLOAT32_DROP)
    low = np.uint32((1 << _FLOAT32_DROP) - 1)
    raw = np.where(k >> 31 != 0, k ^ np.uint32(0x80000000), ~(k | low))  # edge nearest zero
    f = raw.astype(np.uint32).view(np.float32)
    return f.astype(np.float64) if name == "float64" else f


def _order_statistics(hist: Histogram, idx: np.ndarray) -> np.ndarray:
    """Values at 0-based positions ``idx`` of the sorted sample the histogram counts."""
    cum = np.cumsum(hist.counts)
    pos = np.searchsorted(cum, idx, side="right")
    return _decode(hist.dtype, hist.keys[pos])


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """numpy's ``_lerp`` (numpy/lib/_function_base_impl.py), same operations and dtypes."""
    diff_b_a = b - a
    out = np.add(a, diff_b_a * t)
    np.subtract(b, diff_b_a * (1 - t), out=out, where=t >= 0.5, casting="unsafe", dtype=type(out.dtype))
    return out
