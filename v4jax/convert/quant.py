"""FP8 and FP4 weight formats of the DeepSeek-V4 release (spec §3.3): decoding and encoding.

* **E8M0 scale**: one byte b, value 2^(b - 127); b = 255 is NaN. F32 scales are also accepted
  (the Base checkpoints reportedly store them), and must then be powers of two for exactness.
* **FP8** (``F8_E4M3``, e4m3fn, max 448): ``W[o, i] = fp8[o, i] * S[o // 128, i // 128]``, scale
  shape ``[ceil(out/128), ceil(in/128)]``; a partial edge block shares its block's scale.
* **FP4** (``I8`` of shape ``[out, in/2]``): the low nibble of byte j is column 2j, the high nibble
  column 2j+1; nibble -> e2m1 value by the table below; ``W[o, i] = e2m1 * S[o, i // 32]``, scale
  shape ``[out, ceil(in/32)]`` ("MXFP4").

Decoding is done in fp32, where every product (at most 4 significant bits times a power of two) is
exact, then cast to the requested dtype; bf16 keeps 8 significant bits, so fp32 -> bf16 is exact too
unless a value leaves bf16's normal range (scales below about 2^-120, never seen in practice).

Encoding picks, per block, the smallest power-of-two scale that keeps the block's largest magnitude
representable (``2^ceil(log2(amax / max_code))``) and rounds to the nearest code, ties to even.
Weights that came from FP8/FP4 (decoded by this module) therefore encode back to the same values:
their block maximum fixes the same or a smaller scale, and multiplying a code by a power of two
that keeps it in range gives another code.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

FP8_BLOCK = 128
FP4_GROUP = 32
FP8_MAX = 448.0
FP4_MAX = 6.0
E2M1_VALUES = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
E2M1 = np.dtype(ml_dtypes.float4_e2m1fn)

# byte -> (value of the low nibble, value of the high nibble), viewed as one uint64 so that one
# np.take does the whole lookup (much faster than fancy-indexing a [256, 2] table).
_FP4_PAIRS = np.stack([E2M1_VALUES[np.arange(256) & 15], E2M1_VALUES[np.arange(256) >> 4]], -1)
_FP4_PAIRS_U64 = np.ascontiguousarray(_FP4_PAIRS).view(np.uint64).ravel()
# byte -> e4m3 value in fp32 (bytes 0x7f and 0xff are NaN)
_FP8_VALUES = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def fp8_scale_shape(shape) -> tuple[int, int]:
    return ceil_div(shape[0], FP8_BLOCK), ceil_div(shape[1], FP8_BLOCK)


def fp4_packed_shape(shape) -> tuple[int, int]:
    return shape[0], shape[1] // 2


def fp4_scale_shape(shape) -> tuple[int, int]:
    return shape[0], ceil_div(shape[1], FP4_GROUP)


def scale_values(scale: np.ndarray) -> np.ndarray:
    """E8M0 or F32 scales -> float32 values (E8M0 byte b -> 2^(b-127); byte 255 -> NaN)."""
    if scale.dtype == E8M0 or scale.dtype == np.uint8:
        b = scale.view(np.uint8).astype(np.int32)
        out = np.ldexp(np.float32(1.0), np.where(b == 255, 127, b) - 127).astype(np.float32)
        out[b == 255] = np.nan
        return out
    if scale.dtype == np.float32:
        return scale
    raise ValueError(f"scales must be F8_E8M0 or F32, got {scale.dtype}")


def e8m0_scales(scale: np.ndarray) -> np.ndarray | None:
    """E8M0 or F32 scales -> E8M0 (as stored); None when an F32 scale is not a power of two that
    E8M0 holds (2^-127 .. 2^127)."""
    if scale.dtype == E8M0 or scale.dtype == np.uint8:
        return scale.view(E8M0)
    m, e = np.frexp(scale.astype(np.float32))
    b = e.astype(np.int32) + 126  # s = 0.5 * 2^e = 2^(b - 127)
    if not np.all((m == 0.5) & (b >= 0) & (b <= 254)):
        return None
    return b.astype(np.uint8).view(E8M0)


def stored_nan(values: np.ndarray, part: str, fmt: str) -> bool:
    """Whether stored ``part`` bytes ("codes" of ``fmt`` "fp8"/"fp4", or E8M0 "scales") hold a NaN:
    E4M3 codes S.1111.111, E8M0 byte 255 (E2M1 has no NaN)."""
    b = values.view(np.uint8)
    if part == "scales":
        return bool(np.any(b == 0xFF))
    return fmt == "fp8" and bool(np.any((b & 0x7F) == 0x7F))


def _expand_cols(s: np.ndarray, block: int, cols: int) -> np.ndarray:
    """[rows, ceil(cols/block)] -> [rows, cols], each scale repeated over its block of columns."""
    return np.repeat(s, block, axis=1)[:, :cols]


def _scale_column_blocks(v: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """Multiply v [r, c] (fp32, in place) by one scale per ``block`` columns: scales [r, ceil(c/block)]."""
    r, c = v.shape
    if c % block == 0:
        np.multiply(v.reshape(r, c // block, block), scales[:, :, None], out=v.reshape(r, c // block, block))
    else:
        np.multiply(v, _expand_cols(scales, block, c), out=v)
    return v


def dequant_fp8(w: np.ndarray, scale: np.ndarray, row0: int = 0, dtype=np.float32) -> np.ndarray:
    """FP8 e4m3 weight rows [r, in] (rows row0..row0+r of the full matrix) and the full matrix's
    block scale [ceil(out/128), ceil(in/128)] -> [r, in] in ``dtype``."""
    r, c = w.shape
    s = scale_values(scale)
    s_rows = s[(row0 + np.arange(r)) // FP8_BLOCK]  # [r, ceil(in/128)]
    v = _scale_column_blocks(np.take(_FP8_VALUES, w.view(np.uint8)), s_rows, FP8_BLOCK)
    return v if np.dtype(dtype) == np.float32 else v.astype(dtype)


def dequant_fp4(packed: np.ndarray, scale: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Packed FP4 rows [r, in/2] (int8 or uint8) and their scales [r, ceil(in/32)] -> [r, in]."""
    r, half = packed.shape
    c = 2 * half
    s = scale_values(scale)
    v = _scale_column_blocks(np.take(_FP4_PAIRS_U64, packed.view(np.uint8)).view(np.float32).reshape(r, c), s,
                             FP4_GROUP)
    return v if np.dtype(dtype) == np.float32 else v.astype(dtype)


# --------------------------------------------------------------------------------------------------
# Encoding


def _pow2_exponent(amax: np.ndarray, max_code: float) -> np.ndarray:
    """Smallest e (clipped to E8M0's [-127, 127]) with amax / 2^e <= max_code; 0-blocks get -127."""
    x = amax.astype(np.float64) / max_code
    m, p = np.frexp(x)  # x = m * 2^p, m in [0.5, 1)
    e = np.where(m == 0.5, p - 1, p)  # ceil(log2 x)
    e = np.where(x == 0, -127, e)
    return np.clip(e, -127, 127).astype(np.int32)


_BF16_TABLES: dict = {}


def _encode(x: np.ndarray, code_dtype: np.dtype) -> np.ndarray:
    """float32 values within the code's range -> code bytes (round to nearest, ties to even), as
    ml_dtypes' cast does. When every value is exactly a bf16 (always so for weights stored in bf16:
    the block scaling multiplies by a power of two), a 65536-entry table indexed by the bf16 bit
    pattern gives the same codes about four times faster than the cast."""
    halves = np.ascontiguousarray(x).view(np.uint16)  # little endian: [low, high] per value
    low, high = halves[..., 0::2], halves[..., 1::2]
    if not low.any():
        table = _BF16_TABLES.get(code_dtype)
        if table is None:
            v = np.arange(65536, dtype=np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
            v = np.where(np.isfinite(v) & (np.abs(v) <= 448), v, 0)
            table = _BF16_TABLES[code_dtype] = v.astype(code_dtype).view(np.uint8)
        return np.take(table, high)
    return x.astype(code_dtype).view(np.uint8)


def _e8m0(e: np.ndarray) -> np.ndarray:
    return (e + 127).astype(np.uint8).view(E8M0)


def _check_finite(amax: np.ndarray, what: str):
    """``amax``: the blocks' largest magnitudes (NaN or inf when a block holds one)."""
    if not np.isfinite(amax).all():
        raise ValueError(f"{what}: cannot quantise non-finite values (NaN or inf)")


def quant_fp8(w: np.ndarray, what: str = "tensor") -> tuple[np.ndarray, np.ndarray]:
    """[out, in] float -> (F8_E4M3 [out, in], F8_E8M0 scale [ceil(out/128), ceil(in/128)])."""
    w = np.asarray(w, np.float32)
    r, c = w.shape
    rb, cb = fp8_scale_shape(w.shape)
    padded = np.zeros((rb * FP8_BLOCK, cb * FP8_BLOCK), np.float32)
    padded[:r, :c] = np.abs(w)
    amax = padded.reshape(rb, FP8_BLOCK, cb, FP8_BLOCK).max(axis=(1, 3))
    del padded
    _check_finite(amax, what)
    e = _pow2_exponent(amax, FP8_MAX)
    inv = np.ldexp(np.float32(1.0), -e).astype(np.float32)  # exact powers of two
    full = np.repeat(np.repeat(inv, FP8_BLOCK, axis=0)[:r], FP8_BLOCK, axis=1)[:, :c]
    q = _encode(w * full, E4M3).view(E4M3)  # round to nearest, ties to even
    return q, _e8m0(e)


def quant_fp4(w: np.ndarray, what: str = "tensor") -> tuple[np.ndarray, np.ndarray]:
    """[out, in] float (in even) -> (I8 packed [out, in/2], F8_E8M0 scale [out, ceil(in/32)])."""
    w = np.asarray(w, np.float32)
    r, c = w.shape
    if c % 2:
        raise ValueError(f"{what}: FP4 packing needs an even number of columns, got {c}")
    g = ceil_div(c, FP4_GROUP)
    if c % FP4_GROUP:
        padded = np.zeros((r, g * FP4_GROUP), np.float32)
        padded[:, :c] = w
    else:
        padded = w
    grouped = padded.reshape(r, g, FP4_GROUP)
    amax = np.abs(grouped).max(axis=2)
    _check_finite(amax, what)
    e = _pow2_exponent(amax, FP4_MAX)
    x = grouped * np.ldexp(np.float32(1.0), -e).astype(np.float32)[:, :, None]  # exact: powers of two
    # round to nearest, ties to even; the e2m1 byte holds the 4-bit code
    codes = _encode(np.ascontiguousarray(x.reshape(r, g * FP4_GROUP)[:, :c]), E2M1) & 0xF
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(np.int8)
    return packed, _e8m0(e)
