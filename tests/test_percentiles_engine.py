"""zseg.engine.percentiles: merged per-chunk histograms give numpy's percentiles exactly."""

import io
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from zseg.engine import percentiles as P

FIXED_Q = [0, 0.1, 1, 2.5, 50, 99, 99.9, 100]
EXACT_DTYPES = ["uint8", "uint16", "uint32", "int8", "int16", "int32", "float16"]


def _elements(dtype):
    if dtype == "float16":
        return st.floats(width=16, allow_nan=False, allow_infinity=False)
    info = np.iinfo(dtype)
    # mostly small values (many ties), sometimes the full range (overflowing b - a in numpy's lerp)
    return st.one_of(st.integers(-3, 20).filter(lambda v: info.min <= v <= info.max),
                     st.integers(int(info.min), int(info.max)))


@st.composite
def split_arrays(draw, dtype, max_size=200):
    """A 1-d array and a random split of it into contiguous pieces (any sizes, including 1)."""
    values = draw(hnp.arrays(np.dtype(dtype), st.integers(1, max_size), elements=_elements(dtype)))
    cuts = sorted(draw(st.lists(st.integers(0, values.size), max_size=12)))
    pieces = np.split(values, cuts)
    return values, pieces


def _merged(pieces, **kw):
    hists = [P.histogram(p, **kw) for p in pieces]
    return P.merge([P.Histogram.empty(hists[0].dtype)] + hists)


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_merged_percentile_equals_numpy_exactly(dtype, data):
    values, pieces = data.draw(split_arrays(dtype))
    q = FIXED_Q + data.draw(st.lists(st.floats(0, 100), max_size=4))
    with np.errstate(all="ignore"):
        expected = np.percentile(values, q)
        got = P.percentile(_merged(pieces), q)
    assert got.dtype == np.float64 and got.shape == (len(q),)
    # bit-for-bit (NaN where numpy's own float16 lerp overflows, at the same places)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", ["uint16", "int16", "float16"])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_exclude_zeros_equals_numpy_on_nonzero_values(dtype, data):
    values, pieces = data.draw(split_arrays(dtype))
    nonzero = values[values != 0]
    if nonzero.size == 0:
        with pytest.raises(ValueError, match="no voxels"):
            P.percentile(_merged(pieces, exclude_zeros=True), FIXED_Q)
        return
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(
            P.percentile(_merged(pieces, exclude_zeros=True), FIXED_Q), np.percentile(nonzero, FIXED_Q)
        )


def _bound_holds(values, got, q, rel):
    """|got - numpy| <= rel * max(|x_j|, |x_j+1|) + tiny, x_j, x_j+1 the interpolated order statistics."""
    s = np.sort(values.astype(np.float64))
    n = s.size
    idx = (n - 1) * np.asarray(q, np.float64) / 100
    lo = np.clip(np.floor(idx).astype(int), 0, n - 1)
    hi = np.clip(lo + 1, 0, n - 1)
    m = np.maximum(np.abs(s[lo]), np.abs(s[hi]))
    expected = np.percentile(values, q)
    return np.abs(got - expected) <= rel * m + 2.0**-135, np.abs(got - expected) / np.maximum(m, 1e-300)


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_float32_within_stated_bound(data):
    elements = st.one_of(
        st.floats(-2.0**120, 2.0**120, width=32),
        st.floats(-70000, 70000, width=32),
        st.integers(-4096, 4096).map(float),
    )
    values = data.draw(hnp.arrays(np.float32, st.integers(1, 200), elements=elements))
    pieces = np.split(values, sorted(data.draw(st.lists(st.integers(0, values.size), max_size=8))))
    q = FIXED_Q + data.draw(st.lists(st.floats(0, 100), max_size=4))
    got = P.percentile(_merged(pieces), q)
    # exact on the binned values ...
    np.testing.assert_array_equal(got, np.percentile(P.quantize(values), q))
    # ... and within 2**-11 relative (+ interpolation rounding) of the true percentiles
    ok, rel = _bound_holds(values, got, q, 2.0**-P.FLOAT32_MANTISSA_BITS + 2.0**-20)
    assert ok.all(), rel


@settings(max_examples=40, deadline=None)
@given(values=hnp.arrays(np.float64, st.integers(1, 200), elements=st.floats(-1e30, 1e30)))
def test_float64_within_stated_bound(values):
    got = P.percentile(P.histogram(values), FIXED_Q)
    np.testing.assert_array_equal(got, np.percentile(P.quantize(values), FIXED_Q))
    ok, rel = _bound_holds(values, got, FIXED_Q, 2.0**-11 + 2.0**-24 + 2.0**-20)
    assert ok.all(), rel


def test_float32_integers_up_to_4096_and_zero_are_exact():
    values = np.arange(-4096, 4097, dtype=np.float32)
    assert np.array_equal(P.quantize(values), values)
    q = [0, 1, 12.5, 50, 99, 100]
    np.testing.assert_array_equal(P.percentile(P.histogram(values), q), np.percentile(values, q))
    np.testing.assert_array_equal(P.percentile(P.histogram(np.zeros(5, np.float32)), q), 0.0)


def test_float32_histogram_stays_small():
    values = np.random.default_rng(0).normal(100, 30, 500_000).astype(np.float32)
    h = P.histogram(values)
    assert h.keys.size < 20_000 and h.total == values.size


@pytest.mark.parametrize("dtype", EXACT_DTYPES + ["float32", "float64"])
def test_merge_is_order_independent(dtype):
    rng = np.random.default_rng(1)
    values = (rng.normal(0, 50, 3000)).astype(dtype) if dtype.startswith("float") else \
        rng.integers(0, 100, 3000).astype(dtype)
    hists = [P.histogram(p) for p in np.array_split(values, 5)]
    ref = P.merge(hists)
    for perm in itertools.permutations(hists):
        m = P.merge(perm)
        assert m.dtype == ref.dtype
        np.testing.assert_array_equal(m.keys, ref.keys)
        np.testing.assert_array_equal(m.counts, ref.counts)
    whole = P.histogram(values)
    np.testing.assert_array_equal(whole.keys, ref.keys)
    np.testing.assert_array_equal(whole.counts, ref.counts)


@pytest.mark.parametrize("dtype", EXACT_DTYPES + ["float32", "float64"])
def test_many_blocks_equal_one_block(dtype, monkeypatch):
    rng = np.random.default_rng(2)
    values = rng.integers(-50, 50, (7, 9, 11)).astype(dtype)[:, ::2]  # non-contiguous view
    one = P.histogram(values, exclude_zeros=True)
    monkeypatch.setattr(P, "_BLOCK", 13)
    many = P.histogram(values, exclude_zeros=True)
    np.testing.assert_array_equal(one.keys, many.keys)
    np.testing.assert_array_equal(one.counts, many.counts)
    q = [0, 5, 50, 95, 100]
    np.testing.assert_array_equal(P.percentile(many, q), np.percentile(values[values != 0], q))


def test_negative_zero_counts_as_zero():
    values = np.array([-0.0, 0.0, -0.0, 1.0, -1.0], np.float16)
    h = P.histogram(values)
    assert h.keys.size == 3
    assert P.histogram(values, exclude_zeros=True).total == 2
    assert P.histogram(values.astype(np.float32), exclude_zeros=True).total == 2


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_voxels_are_refused_with_their_count(dtype, bad):
    values = np.ones((4, 5), dtype)
    values[0, :3] = bad
    with pytest.raises(ValueError, match=r"3 of 20 voxels are NaN or infinite"):
        P.histogram(values)


def test_float64_beyond_float32_range_is_refused():
    with pytest.raises(ValueError, match="1 of 2 voxels"):
        P.histogram(np.array([1.0, 1e39]))


def test_empty_histogram_is_refused():
    with pytest.raises(ValueError, match="no voxels to compute percentiles from"):
        P.percentile(P.Histogram.empty("uint16"), [1, 99])
    with pytest.raises(ValueError, match="no voxels"):
        P.percentile(P.histogram(np.zeros(10, np.uint8), exclude_zeros=True), [1, 99])


def test_percentile_out_of_range_is_refused():
    h = P.histogram(np.arange(10, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        P.percentile(h, [-1, 50])
    with pytest.raises(ValueError):
        P.percentile(h, [50, 100.5])


def test_scalar_q_returns_zero_d():
    out = P.percentile(P.histogram(np.arange(11, dtype=np.uint16)), 50)
    assert out.shape == () and out == 5.0


def test_unsupported_dtype_is_refused():
    with pytest.raises(ValueError, match="not supported"):
        P.histogram(np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="not supported"):
        P.Histogram.empty("complex64")


def test_merge_refuses_mixed_dtypes_and_nothing():
    with pytest.raises(ValueError, match="different dtypes"):
        P.merge([P.Histogram.empty("uint8"), P.Histogram.empty("uint16")])
    with pytest.raises(ValueError):
        P.merge([])


def test_arrays_roundtrip_through_npz():
    h = P.histogram(np.random.default_rng(3).normal(size=1000).astype(np.float32))
    buf = io.BytesIO()
    np.savez(buf, **h.to_arrays())
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as d:
        back = P.Histogram.from_arrays(dict(d))
    assert back.dtype == "float32" and back.total == 1000
    np.testing.assert_array_equal(back.keys, h.keys)
    np.testing.assert_array_equal(back.counts, h.counts)
    arrays = h.to_arrays() | {"key_bits": np.array(16)}
    with pytest.raises(ValueError, match="recompute"):
        P.Histogram.from_arrays(arrays)


def test_histogram_validates_its_fields():
    with pytest.raises(ValueError, match="sorted"):
        P.Histogram("uint8", np.array([2, 1], np.uint64), np.array([1, 1], np.int64))
    with pytest.raises(ValueError, match="out of range"):
        P.Histogram("uint8", np.array([256], np.uint64), np.array([1], np.int64))
    assert P.Histogram.empty(np.dtype("int16")).dtype == "int16"
