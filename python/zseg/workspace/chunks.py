"""Lists of chunks as users and tasks write them: ``--chunks 0-99,105`` and ``--shard i/N``.

:func:`select_chunks` reads them (the chunks one task works on); :func:`chunk_ranges` writes a
list back in the same syntax, for messages and resume reports.
"""

from __future__ import annotations

import re

from zseg.errors import UserError


def chunk_ranges(indices) -> str:
    """Indices as the ``--chunks`` syntax: ``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    parts, run = [], None
    for i in sorted(int(v) for v in indices):
        if run and i == run[1] + 1:
            run[1] = i
            continue
        if run:
            parts.append(run)
        run = [i, i]
    if run:
        parts.append(run)
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def short_ranges(spec: str, limit: int = 120) -> str:
    """``spec`` cut to about ``limit`` characters at a comma, saying how many ranges were left out."""
    if len(spec) <= limit:
        return spec
    cut = spec[:limit].rsplit(",", 1)[0]
    return f"{cut},... ({spec.count(',') - cut.count(',')} more ranges)"


_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def select_chunks(nchunks: int, chunks: str | None = None, shard: str | None = None, *,
                  what: str = "chunks") -> list[int]:
    """The chunk indices a task works on.

    Parameters
    ----------
    nchunks : int
        Number of chunks in the grid.
    chunks : str, optional
        Comma-separated indices and inclusive ranges, e.g. ``"0-99,105"``.
    shard : str, optional
        ``"i/N"``: the i-th (0-based) of N contiguous, near-equal shares of the chunks
        (after ``chunks`` when both are given).
    what : str
        What the indices count, for messages: ``"chunks"``, or ``"units"`` (predict's).

    Returns
    -------
    list of int, ascending and without repeats.
    """
    selected = list(range(nchunks))
    if chunks is not None and chunks.strip() not in ("", "all"):
        picked: set[int] = set()
        for part in chunks.split(","):
            m = _RANGE.match(part)
            if not m:
                raise UserError(
                    f"--chunks {chunks!r}: {part!r} is not an index or a range; "
                    "write indices and inclusive ranges such as 0-99,105."
                )
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo or hi >= nchunks:
                raise UserError(
                    f"--chunks {chunks!r}: {part!r} is outside 0-{nchunks - 1} "
                    f"(this run has {nchunks} {what})."
                )
            picked.update(range(lo, hi + 1))
        selected = sorted(picked)
    if shard is not None:
        m = re.match(r"^\s*(\d+)\s*/\s*(\d+)\s*$", shard)
        if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
            raise UserError(
                f"--shard {shard!r}: write i/N with 0 <= i < N, e.g. 0/8 for the first of 8 shards."
            )
        i, n = int(m.group(1)), int(m.group(2))
        k = len(selected)
        selected = selected[i * k // n : (i + 1) * k // n]
    return selected
