"""FP8 / FP4 / E8M0 decoding and encoding (spec §3.3), bit-exact against an independent decoder.

The reference decoder below works from the bit layouts alone (sign / exponent / mantissa fields, in
float64 with Python arithmetic), not from ml_dtypes or the library's lookup tables. bf16 results are
compared as bit patterns: the expected bf16 pattern is the top half of the float32 pattern of the
exact float64 value, after checking that the value is exactly representable (so that "dequantise
into bf16 is lossless" is tested, not assumed). Tolerance: none (bit equality).
"""

import ml_dtypes
import numpy as np
import pytest

from v4jax.convert import quant

# --------------------------------------------------------------------------------------------------
# Independent reference decoders


def ref_e4m3(byte: int) -> float:
    """e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no inf; S.1111.111 is NaN."""
    s, e, m = byte >> 7, (byte >> 3) & 15, byte & 7
    if e == 15 and m == 7:
        return float("nan")
    v = (m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return -v if s else v


def ref_e2m1(nibble: int) -> float:
    """e2m1: 1 sign, 2 exponent (bias 1), 1 mantissa bit."""
    s, e, m = nibble >> 3, (nibble >> 1) & 3, nibble & 1
    v = m * 0.5 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
    return -v if s else v


def ref_e8m0(byte: int) -> float:
    return float("nan") if byte == 255 else 2.0 ** (byte - 127)


E4M3_TABLE = np.array([ref_e4m3(b) for b in range(256)])
E2M1_TABLE = np.array([ref_e2m1(n) for n in range(16)])


def ref_dequant_fp8(w_bytes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float64 [out, in]: W[o, i] = e4m3(w[o, i]) * S[o // 128, i // 128] (S already as values)."""
    out = np.empty(w_bytes.shape)
    for o in range(w_bytes.shape[0]):
        for i0 in range(0, w_bytes.shape[1], 128):
            out[o, i0:i0 + 128] = E4M3_TABLE[w_bytes[o, i0:i0 + 128]] * scale[o // 128, i0 // 128]
    return out


def ref_dequant_fp4(packed_bytes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float64 [out, 2*in2]: low nibble of byte j -> column 2j, high nibble -> 2j+1, times S[o, i // 32]."""
    r, half = packed_bytes.shape
    out = np.empty((r, 2 * half))
    for j in range(half):
        out[:, 2 * j] = E2M1_TABLE[packed_bytes[:, j] & 15]
        out[:, 2 * j + 1] = E2M1_TABLE[packed_bytes[:, j] >> 4]
    for g in range(scale.shape[1]):
        out[:, g * 32:(g + 1) * 32] *= scale[:, g:g + 1]
    return out


def bf16_bits_exact(x: np.ndarray) -> np.ndarray:
    """float64 values -> bf16 bit patterns, asserting every value is exactly representable."""
    f32 = x.astype(np.float32)
    assert (f32.astype(np.float64) == x).all(), "value not exact in fp32"
    bits = f32.view(np.uint32)
    assert (bits & 0xFFFF == 0).all(), "value not exact in bf16"
    return (bits >> 16).astype(np.uint16)


def random_fp8_bytes(rng, shape):
    b = rng.integers(0, 256, shape, dtype=np.uint8)
    b[(b & 0x7F) == 0x7F] = 0x38  # no NaN codes in weights
    return b


# --------------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("shape", [(300, 260), (128, 128), (5, 7), (257, 129)])
@pytest.mark.parametrize("scale_kind", ["e8m0", "f32"])
def test_fp8_dequant_bit_exact(shape, scale_kind):
    rng = np.random.default_rng(sum(shape))
    w = random_fp8_bytes(rng, shape)
    sshape = (-(-shape[0] // 128), -(-shape[1] // 128))
    sbytes = rng.integers(100, 150, sshape, dtype=np.uint8)
    svals = np.array([[ref_e8m0(int(b)) for b in row] for row in sbytes])
    scale = sbytes.view(ml_dtypes.float8_e8m0fnu) if scale_kind == "e8m0" else svals.astype(np.float32)
    expected = ref_dequant_fp8(w, svals)
    got_bf16 = quant.dequant_fp8(w.view(ml_dtypes.float8_e4m3fn), scale, dtype=ml_dtypes.bfloat16)
    assert got_bf16.dtype == ml_dtypes.bfloat16 and got_bf16.shape == shape
    np.testing.assert_array_equal(got_bf16.view(np.uint16), bf16_bits_exact(expected))
    got_f32 = quant.dequant_fp8(w.view(ml_dtypes.float8_e4m3fn), scale)
    np.testing.assert_array_equal(got_f32.astype(np.float64), expected)
    # a block of rows that starts inside a 128-row scale block (streaming reads)
    r0, r1 = min(100, shape[0] - 1), shape[0]
    part = quant.dequant_fp8(w[r0:r1].view(ml_dtypes.float8_e4m3fn), scale, row0=r0, dtype=ml_dtypes.bfloat16)
    np.testing.assert_array_equal(part.view(np.uint16), bf16_bits_exact(expected[r0:r1]))


@pytest.mark.parametrize("shape", [(70, 96), (33, 80), (4, 2), (129, 4096)])
def test_fp4_dequant_bit_exact(shape):
    rng = np.random.default_rng(shape[0] * shape[1])
    packed = rng.integers(0, 256, (shape[0], shape[1] // 2), dtype=np.uint8)
    groups = -(-shape[1] // 32)
    sbytes = rng.integers(110, 140, (shape[0], groups), dtype=np.uint8)
    svals = np.array([[ref_e8m0(int(b)) for b in row] for row in sbytes]).reshape(shape[0], groups)
    expected = ref_dequant_fp4(packed, svals)
    got = quant.dequant_fp4(packed.view(np.int8), sbytes.view(ml_dtypes.float8_e8m0fnu), dtype=ml_dtypes.bfloat16)
    assert got.shape == shape
    np.testing.assert_array_equal(got.view(np.uint16), bf16_bits_exact(expected))
    got32 = quant.dequant_fp4(packed.view(np.int8), svals.astype(np.float32))  # F32 scales
    np.testing.assert_array_equal(got32.astype(np.float64), expected)


def test_nibble_order_and_table():
    # byte 0x2F: low nibble 0xF -> -6 in column 0, high nibble 0x2 -> 1 in column 1
    packed = np.array([[0x2F, 0x71]], np.uint8)
    scale = np.array([[127]], np.uint8).view(ml_dtypes.float8_e8m0fnu)  # 2^0
    np.testing.assert_array_equal(quant.dequant_fp4(packed.view(np.int8), scale), [[-6.0, 1.0, 0.5, 6.0]])
    assert list(E2M1_TABLE) == [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6]


def test_e8m0_values():
    b = np.arange(256, dtype=np.uint8)
    got = quant.scale_values(b.view(ml_dtypes.float8_e8m0fnu))
    want = np.array([ref_e8m0(int(x)) for x in b])
    assert np.isnan(got[255]) and np.isnan(want[255])
    np.testing.assert_array_equal(got[:255].astype(np.float64), want[:255])


# --------------------------------------------------------------------------------------------------
# Encoding: an independent brute-force quantiser (nearest code by search over all codes, ties to
# the even code; block scale 2^ceil(log2(amax / max_code)))


def ref_block_exponent(amax: float, max_code: float) -> int:
    if amax == 0:
        return -127
    e = int(np.ceil(np.log2(amax / max_code)))
    while amax / 2.0**e > max_code:  # guard float error in log2
        e += 1
    while e > -127 and amax / 2.0 ** (e - 1) <= max_code:
        e -= 1
    return e


def ref_nearest_codes(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    codes = np.array([c for c in range(len(table)) if np.isfinite(table[c])])
    vals = table[codes]
    d = np.abs(x.reshape(-1, 1) - vals[None, :])
    best = d.min(axis=1, keepdims=True)
    cand = np.where(d == best, codes[None, :], 10**6)
    # among equally near codes: prefer the sign of x (so -0 stays -0), then the even code
    out = []
    for row, xv in zip(cand, x.reshape(-1)):
        cs = [c for c in row if c < 10**6]
        sign_bit = 0x80 if len(table) == 256 else 0x8
        same_sign = [c for c in cs if bool(c & sign_bit) == bool(np.signbit(xv))] or cs
        even = [c for c in same_sign if c % 2 == 0] or same_sign
        out.append(even[0])
    return np.array(out).reshape(x.shape)


# float32 inputs go through ml_dtypes' cast, bf16-exact ones through the library's bf16 lookup table
@pytest.mark.parametrize("bf16_values", [False, True])
def test_fp8_quant_matches_reference_quantiser(bf16_values):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((150, 140)) * np.exp(rng.uniform(-3, 3, (150, 1)))).astype(np.float32)
    if bf16_values:
        w = w.astype(ml_dtypes.bfloat16).astype(np.float32)
    w[:2, :5] = 0.0
    q, s = quant.quant_fp8(w)
    assert q.dtype == ml_dtypes.float8_e4m3fn and s.dtype == ml_dtypes.float8_e8m0fnu and s.shape == (2, 2)
    for bi in range(2):
        for bj in range(2):
            blk = w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128].astype(np.float64)
            e = ref_block_exponent(np.abs(blk).max(), 448.0)
            assert int(s.view(np.uint8)[bi, bj]) == e + 127
            codes = ref_nearest_codes(blk / 2.0**e, E4M3_TABLE)
            got = q.view(np.uint8)[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
            np.testing.assert_array_equal(got, codes)


@pytest.mark.parametrize("bf16_values", [False, True])
def test_fp4_quant_matches_reference_quantiser(bf16_values):
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((9, 80)) * 3).astype(np.float32)
    if bf16_values:
        w = w.astype(ml_dtypes.bfloat16).astype(np.float32)
    w[0, :32] = 0.0
    w[1, 3] = -0.0
    packed, s = quant.quant_fp4(w)
    assert packed.shape == (9, 40) and s.shape == (9, 3)
    p = packed.view(np.uint8)
    codes = np.stack([p & 15, p >> 4], axis=-1).reshape(9, 80)
    for o in range(9):
        for g in range(3):
            blk = w[o, g * 32:(g + 1) * 32].astype(np.float64)
            e = ref_block_exponent(np.abs(blk).max(), 6.0)
            assert int(s.view(np.uint8)[o, g]) == e + 127
            np.testing.assert_array_equal(codes[o, g * 32:(g + 1) * 32], ref_nearest_codes(blk / 2.0**e, E2M1_TABLE))


def test_requantising_dequantised_weights_is_lossless():
    """Values decoded from FP8/FP4 encode back to the same values (the Orbax -> official round trip)."""
    rng = np.random.default_rng(5)
    w8 = random_fp8_bytes(rng, (260, 300)).view(ml_dtypes.float8_e4m3fn)
    s8 = rng.integers(110, 140, (3, 3), dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu)
    v8 = quant.dequant_fp8(w8, s8)
    np.testing.assert_array_equal(quant.dequant_fp8(*quant.quant_fp8(v8)).view(np.uint32), v8.view(np.uint32))
    p4 = rng.integers(0, 256, (50, 48), dtype=np.uint8).view(np.int8)
    s4 = rng.integers(110, 140, (50, 3), dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu)
    v4 = quant.dequant_fp4(p4, s4)
    np.testing.assert_array_equal(quant.dequant_fp4(*quant.quant_fp4(v4)).view(np.uint32), v4.view(np.uint32))


def test_quantise_refuses_non_finite():
    w = np.ones((4, 4), np.float32)
    w[1, 1] = np.nan
    with pytest.raises(ValueError, match="layers.0.attn.wq_a.*NaN"):
        quant.quant_fp8(w, what="layers.0.attn.wq_a.weight")


def test_quantisers_round_ties_to_even():
    """Values exactly halfway between two codes (where round-to-nearest-even matters)."""
    fp4_ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, -5.0])
    w = np.zeros((1, 32), np.float32)
    w[0, 0] = 6.0  # block max 6 -> scale 2^0
    w[0, 1:1 + fp4_ties.size] = fp4_ties
    packed, s = quant.quant_fp4(w)
    assert int(s.view(np.uint8)[0, 0]) == 127
    p = packed.view(np.uint8)[0]
    codes = np.stack([p & 15, p >> 4], axis=-1).reshape(32)
    np.testing.assert_array_equal(codes, ref_nearest_codes(w[0].astype(np.float64), E2M1_TABLE))
    np.testing.assert_array_equal(E2M1_TABLE[codes[1:1 + fp4_ties.size]], [0, 1, 1, 2, 2, 4, 4, -0., -2, -4])

    pos = E4M3_TABLE[:0x7F]  # positive finite e4m3 values, increasing
    mids = (pos[1:] + pos[:-1]) / 2  # every halfway point
    w8 = np.zeros((1, 128 * 2), np.float32)
    w8[0, 0] = 448.0
    w8[0, 1:1 + mids.size] = mids
    q, s8 = quant.quant_fp8(w8)
    assert int(s8.view(np.uint8)[0, 0]) == 127
    np.testing.assert_array_equal(q.view(np.uint8)[0], ref_nearest_codes(w8[0].astype(np.float64), E4M3_TABLE))
