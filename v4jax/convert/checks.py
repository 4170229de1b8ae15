"""Checks shared by both directions of conversion: the arguments, the output path, the values read.

Arguments are checked before anything is read or written, and each bad one is a ValueError naming
its command-line flag (the library's keyword argument of the same name) and the values allowed.
Values are checked as they stream through the readers (``source.LeafSource.read``,
``orbax_io.OrbaxParams.read``): a NaN or inf weight, or a hash-routing entry that names no expert,
would otherwise load silently and surface only as non-finite or wrong logits.
"""

from __future__ import annotations

import math
import operator
from pathlib import Path

import ml_dtypes
import numpy as np

from v4jax.convert.safetensors_io import CheckpointError

BF16 = np.dtype(ml_dtypes.bfloat16)


# --------------------------------------------------------------------------------------------------
# Arguments


def _whole(value) -> int:
    """``value`` as an int (ints and numpy ints), or 0 for anything else (floats, strings, bools)."""
    try:
        return 0 if isinstance(value, bool) else operator.index(value)
    except TypeError:
        return 0


def positive_int(value, flag: str, what: str) -> int:
    """``value`` as an int >= 1, else ValueError naming ``flag`` (e.g. "--window")."""
    if _whole(value) < 1:
        raise ValueError(f"{flag} {value!r}: use a whole number >= 1 ({what})")
    return _whole(value)


def positive_mb(value, flag: str = "--block-mb") -> float:
    """``value`` as a finite number of MiB > 0, else ValueError naming ``flag``."""
    try:
        mb = float(value)
    except (TypeError, ValueError):
        mb = math.nan
    if isinstance(value, bool) or not (math.isfinite(mb) and mb > 0):
        raise ValueError(f"{flag} {value!r}: use a number of MiB > 0, e.g. 32")
    return mb


def check_mesh(mesh: dict | None) -> None:
    """A target mesh for to-orbax: axis name -> size, axes among v4jax.parallel's, sizes >= 1."""
    if mesh is None:
        return
    from v4jax.parallel import MESH_AXES  # noqa: PLC0415

    unknown = sorted(str(a) for a in mesh if a not in MESH_AXES)
    if unknown:
        raise ValueError(f"--mesh axes must be among {', '.join(MESH_AXES)}, got {', '.join(unknown)}")
    for axis, size in mesh.items():
        if _whole(size) < 1:
            raise ValueError(f"--mesh {axis}={size!r}: a mesh axis's size must be a whole number >= 1")


def check_separate(src: str | Path, dst: str | Path) -> None:
    """Refuse an output directory that is, contains or lies inside the source: writing it (and with
    --overwrite, first removing what was there) would destroy the source. Paths are compared
    resolved, so a symlink to the source counts as the source."""
    s, d = Path(src).resolve(), Path(dst).resolve()
    if s == d:
        how = "is"
    elif d in s.parents:
        how = "contains"
    elif s in d.parents:
        how = "lies inside"
    else:
        return
    raise ValueError(f"--dst {dst} {how} --src {src}: writing it would destroy the source checkpoint; "
                     f"choose a --dst outside {src}")


# --------------------------------------------------------------------------------------------------
# Values


def int_range(config, path: tuple) -> tuple[int, int] | None:
    """[lo, hi) of the values an integer leaf may hold, or None for no bound. The only integer leaf
    is ``tid2eid``, the hash-routing table: expert ids, 0 .. n_routed_experts - 1."""
    if path and path[-1] == "tid2eid":
        return 0, int(config.n_routed_experts)
    return None


def check_values(values: np.ndarray, where: str, fix: str, bounds: tuple[int, int] | None = None,
                 lead: tuple = (), row0: int = 0) -> None:
    """Raise CheckpointError("``where``: what is wrong; ``fix``") when a float block holds NaN or
    inf, or an integer block a value outside ``bounds`` [lo, hi). ``values`` is rows ``row0``.. of
    axis -2 at the leading index ``lead`` of its tensor (as ``source.blocks`` gives), for the
    error's position.

    A good block costs one or two read-only passes. numpy's isfinite is fast on its own floats but
    slow on ml_dtypes' bfloat16 (2 GB/s); there two integer maxima test the bits instead (25 GB/s):
    NaN and inf have all exponent bits set, so as int16 a positive one is >= 0x7f80 and as uint16 a
    negative one >= 0xff80, while every finite value is below both. Counting and locating the bad
    values happens only once there are some.
    """
    if np.issubdtype(values.dtype, np.integer):
        if bounds is None or values.size == 0 or (values.min() >= bounds[0] and values.max() < bounds[1]):
            return
        bad = (values < bounds[0]) | (values >= bounds[1])
        what = f"values outside [{bounds[0]}, {bounds[1]}) (the config's expert ids)"
    else:
        if values.dtype == BF16:
            if values.view(np.int16).max(initial=0) < 0x7F80 and values.view(np.uint16).max(initial=0) < 0xFF80:
                return
        elif np.isfinite(values).all():
            return
        bad = ~np.isfinite(values.astype(np.float32))
        what = "non-finite values (NaN or inf)"
    first = int(np.argmax(bad.reshape(-1)))
    index = [int(i) for i in np.unravel_index(first, values.shape)]
    at = [*lead, row0 + index[0], *index[1:]] if index else list(lead)
    raise CheckpointError(f"{where}: {int(bad.sum())} {what}, the first ({values.reshape(-1)[first]}) at {at}; {fix}")
