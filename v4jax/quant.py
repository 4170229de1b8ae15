"""V4's FP8 and FP4 block formats in JAX (spec §2.11, §3.3): quantisation for training with a
straight-through backward (``train.precision``).

* **FP8** (E4M3, largest code 448): weights in 128 x 128 blocks, activations in 1 x 128 blocks
  along the contracted (last) axis. Every block's scale is the power of two
  2^ceil(log2(amax / 448)) (a UE8M0 scale), amax floored at 1e-4.
* **FP4** (E2M1, largest code 6; the routed experts in quantisation-aware training): 1 x 32 blocks
  along the input (last) axis, scale 2^ceil(log2(amax / 6)), amax floored at 6 * 2^-126.

A value is divided by its block's scale, clamped to the largest code, rounded to the nearest code
(ties to even) and multiplied back. The result is a code times a power of two, exact in bf16 and
fp32, so a matmul of quantised operands in bf16 or fp32 (fp32 accumulation) computes what an FP8
GEMM with these scales computes, up to the order of the sums. A block that the axis length leaves
partial shares its scale over the elements it has (the checkpoint's edge blocks).

``Quantized`` marks a weight whose matmul quantises it (in its format) and the matmul's input (FP8,
1 x 128): ``v4jax.layers.linear`` and the MoE's expert matmuls take it in place of an array.
``v4jax.schema.for_training`` wraps the parameters the release stores in FP8/FP4 this way, and with
``train.indexer_fp4`` puts an ``IndexerQK`` marker in each lightning indexer (its queries and keys
Hadamard-rotated and in FP4). ``encode_rows``/``decode_rows`` store values as E4M3 codes and E8M0
scales (the decode cache's FP8 entries).

``BlockScaled`` is a weight kept in memory as the release stores it (``from_pretrained(...,
quantized=True)``): its codes and block scales, decoded where a matmul reads it. ``weight_values``
gives any of the three kinds of weight as the array a matmul multiplies.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
FP8_MAX, FP8_FLOOR, FP8_BLOCK = 448.0, 1e-4, 128
FP4_MAX, FP4_FLOOR, FP4_BLOCK = 6.0, 6.0 * 2.0**-126, 32
PRECISIONS = ("bf16", "fp8", "fp8+fp4qat")


def pow2_scale(amax: jax.Array, qmax: float, floor: float) -> jax.Array:
    """The smallest power of two s with s * qmax >= max(amax, floor), in fp32, exactly: with
    a = m 2^E and qmax = mq 2^Eq (mantissas in [0.5, 1)), s = 2^(E - Eq), doubled when m > mq."""
    m, e = jnp.frexp(jnp.maximum(amax.astype(F32), floor))
    mq, eq = np.frexp(np.float32(qmax))
    return jnp.ldexp(jnp.ones_like(m), e - int(eq) + (m > mq).astype(e.dtype))


def _round_e2m1(y: jax.Array) -> jax.Array:
    """|y| <= 6 to the nearest E2M1 value (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives), ties to even:
    steps of 0.5 below 2, of 1 below 4, of 2 above (jnp.round rounds half to even)."""
    a = jnp.abs(y)
    step = jnp.where(a < 2, 0.5, jnp.where(a < 4, 1.0, 2.0))
    return jnp.sign(y) * jnp.round(a / step) * step


def _round_e4m3(y: jax.Array) -> jax.Array:
    """|y| <= 448 to the nearest E4M3 value, ties to even (the cast rounds so)."""
    return y.astype(jnp.float8_e4m3fn).astype(F32)


FORMATS = {"fp8": (FP8_MAX, FP8_FLOOR, _round_e4m3), "fp4": (FP4_MAX, FP4_FLOOR, _round_e2m1)}


def quantize(x: jax.Array, block: tuple[int, int], fmt: str) -> jax.Array:
    """x [..., R, C] in ``block`` = (rows, cols) blocks over its last two axes (leading axes apart),
    quantised in ``fmt`` ("fp8", "fp4") and returned as values in x's dtype. A 1-D x is one row."""
    qmax, floor, round_code = FORMATS[fmt]
    if x.ndim == 1:
        return quantize(x[None], block, fmt)[0]
    br, bc = block
    *lead, r, c = x.shape
    pr, pc = -r % br, -c % bc
    xf = jnp.pad(x.astype(F32), [(0, 0)] * len(lead) + [(0, pr), (0, pc)])
    xb = xf.reshape(*lead, (r + pr) // br, br, (c + pc) // bc, bc)
    s = pow2_scale(jnp.max(jnp.abs(xb), axis=(-3, -1), keepdims=True), qmax, floor)
    q = round_code(jnp.clip(xb / s, -qmax, qmax)) * s
    return q.reshape(xf.shape)[..., :r, :c].astype(x.dtype)


def encode_rows(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """x [..., C] in FP8 with 1 x ``block`` blocks along C, as stored: (codes [..., C] E4M3, scales
    [..., ceil(C / block)] E8M0). ``decode_rows`` gives ``quantize(x, (1, block), "fp8")``."""
    c, pad = x.shape[-1], -x.shape[-1] % block
    xb = jnp.pad(x.astype(F32), [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(*x.shape[:-1], -1, block)
    s = pow2_scale(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), FP8_MAX, FP8_FLOOR)
    codes = jnp.clip(xb / s, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return codes.reshape(*x.shape[:-1], -1)[..., :c], s[..., 0].astype(jnp.float8_e8m0fnu)


def decode_rows(codes: jax.Array, scales: jax.Array, block: int) -> jax.Array:
    """``encode_rows``'s (codes, scales) -> the values [..., C] in fp32."""
    return codes.astype(F32) * jnp.repeat(scales.astype(F32), block, axis=-1)[..., :codes.shape[-1]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def fake_quant(x: jax.Array, block: tuple[int, int], fmt: str) -> jax.Array:
    """``quantize`` whose gradient is the identity (straight-through)."""
    return quantize(x, block, fmt)


fake_quant.defvjp(lambda x, block, fmt: (quantize(x, block, fmt), None), lambda block, fmt, _, g: (g,))


def activation(x: jax.Array) -> jax.Array:
    """A matmul's input x [..., K] in FP8 with 1 x 128 blocks along K (straight-through)."""
    return fake_quant(x.reshape(-1, x.shape[-1]), (1, FP8_BLOCK), "fp8").reshape(x.shape)


def weight(w: jax.Array, fmt: str) -> jax.Array:
    """A weight [..., out, in] in FP8 (128 x 128 blocks) or FP4 (1 x 32 along ``in``), straight-through."""
    return fake_quant(w, (FP8_BLOCK, FP8_BLOCK) if fmt == "fp8" else (1, FP4_BLOCK), fmt)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w"], meta_fields=["fmt"])
@dataclasses.dataclass(frozen=True)
class Quantized:
    """A weight [..., out, in] that its matmul quantises in ``fmt`` ("fp8": 128 x 128 blocks;
    "fp4": 1 x 32), together with the matmul's input (FP8, 1 x 128). A pytree with one leaf, so it
    scans, shards and slices like the array it holds."""

    w: jax.Array
    fmt: str

    @property
    def shape(self):
        return self.w.shape

    def values(self) -> jax.Array:
        """The quantised weight (straight-through to ``w``)."""
        return weight(self.w, self.fmt)


@functools.partial(jax.tree_util.register_dataclass, data_fields=[], meta_fields=["fmt"])
@dataclasses.dataclass(frozen=True)
class IndexerQK:
    """A marker in the lightning indexer's parameters (key ``qk``, added by ``v4jax.schema.for_training``): its
    queries and keys are rotated by the orthonormal Hadamard matrix and quantised in ``fmt`` ("fp4":
    1 x 32 blocks) before their scores, as in V4's quantisation-aware training (spec §2.11, §4). A
    pytree without leaves: it scans and shards as nothing."""

    fmt: str


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Hadamard matrix of order n (a power of two) in Sylvester's order: H_1 = [1],
    H_2k = [[H_k, H_k], [H_k, -H_k]], scaled by n^-1/2."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two width, got {n}")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h * np.float32(n**-0.5)


def indexer_qk(x: jax.Array, marker: IndexerQK) -> jax.Array:
    """The indexer's queries or keys x [..., c] rotated by the Hadamard matrix and quantised (1 x 32
    blocks along c, straight-through), in x's dtype."""
    c = x.shape[-1]
    rotated = jnp.einsum("...i,ij->...j", x.astype(F32), jnp.asarray(hadamard(c)))
    return fake_quant(rotated.reshape(-1, c), (1, FP4_BLOCK), marker.fmt).reshape(x.shape).astype(x.dtype)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "scales"], meta_fields=["fmt"])
@dataclasses.dataclass(frozen=True)
class BlockScaled:
    """A weight [..., out, in] kept as the release stores it (spec §3.3), decoded where it is used.

    * "fp8": ``codes`` E4M3 [..., out, in], ``scales`` E8M0 [..., ceil(out/128), ceil(in/128)].
    * "fp4": ``codes`` uint8 [..., out, in/2], two E2M1 codes a byte (column 2j in the low nibble,
      2j+1 in the high one), ``scales`` E8M0 [..., out, ceil(in/32)].

    Value = code x its block's scale, exact in bf16 and fp32. A pytree of two leaves with the
    weight's leading axes (layers, experts), so it stacks, slices, shards and saves like the array
    it stands for; ``shape`` is that array's."""

    codes: jax.Array
    scales: jax.Array
    fmt: str

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, r, c = self.codes.shape
        return (*lead, r, 2 * c if self.fmt == "fp4" else c)

    def values(self, dtype) -> jax.Array:
        """The weight [..., out, in] in ``dtype``: codes times scales (one fusion with its reader)."""
        *_, r, c = self.shape
        s = self.scales.astype(F32)
        if self.fmt == "fp4":
            pairs = jax.lax.bitcast_convert_type(self.codes, jnp.float4_e2m1fn)  # [..., out, in/2, 2]
            codes = pairs.reshape(self.shape).astype(F32)
            s = jnp.repeat(s, FP4_BLOCK, axis=-1)
        else:
            codes = self.codes.astype(F32)
            s = jnp.repeat(jnp.repeat(s, FP8_BLOCK, axis=-2)[..., :r, :], FP8_BLOCK, axis=-1)
        return (codes * s[..., :c]).astype(dtype)


def block_scaled_spec(shape: tuple, fmt: str) -> BlockScaled:
    """The ``BlockScaled`` of a weight of ``shape`` [..., out, in] in ``fmt`` as ShapeDtypeStructs."""
    *lead, r, c = shape
    if fmt == "fp4":
        codes = jax.ShapeDtypeStruct((*lead, r, c // 2), jnp.uint8)
        scales = (*lead, r, -(-c // FP4_BLOCK))
    else:
        codes = jax.ShapeDtypeStruct(tuple(shape), jnp.float8_e4m3fn)
        scales = (*lead, -(-r // FP8_BLOCK), -(-c // FP8_BLOCK))
    return BlockScaled(codes, jax.ShapeDtypeStruct(scales, jnp.float8_e8m0fnu), fmt)


def block_scaled(w: jax.Array, fmt: str) -> BlockScaled:
    """w [..., out, in] encoded as the release stores weights: "fp8" in 128 x 128 blocks, "fp4" in
    1 x 32 (in even). Each block's scale is the smallest power of two that keeps its largest
    magnitude within the codes' range (2^-126 for a block of zeros, which decodes to zeros as the
    converter's 2^-127 does); codes are rounded to nearest, ties to even. As
    ``v4jax.convert.quant``'s encoders on the host, in one jitted pass on the devices."""
    qmax, _, _ = FORMATS[fmt]
    br, bc = (FP8_BLOCK, FP8_BLOCK) if fmt == "fp8" else (1, FP4_BLOCK)
    *lead, r, c = w.shape
    pr, pc = -r % br, -c % bc
    xf = jnp.pad(w.astype(F32), [(0, 0)] * len(lead) + [(0, pr), (0, pc)])
    xb = xf.reshape(*lead, (r + pr) // br, br, (c + pc) // bc, bc)
    s = pow2_scale(jnp.max(jnp.abs(xb), axis=(-3, -1), keepdims=True), qmax, qmax * 2.0**-126)
    y = jnp.clip(xb / s, -qmax, qmax).reshape(xf.shape)[..., :r, :c]
    scales = s[..., 0, :, 0].astype(jnp.float8_e8m0fnu)
    if fmt == "fp8":
        return BlockScaled(y.astype(jnp.float8_e4m3fn), scales, fmt)
    pairs = y.astype(jnp.float4_e2m1fn).reshape(*lead, r, c // 2, 2)
    return BlockScaled(jax.lax.bitcast_convert_type(pairs, jnp.uint8), scales, fmt)


def is_block_scaled(x) -> bool:
    return isinstance(x, BlockScaled)


def holds_block_scaled(params) -> bool:
    """Whether some weight of ``params`` is ``BlockScaled``."""
    return any(is_block_scaled(w) for w in jax.tree.leaves(params, is_leaf=is_block_scaled))


def dequantized(params, dtype):
    """``params`` with every ``BlockScaled`` weight decoded to an array in ``dtype``."""
    return jax.tree.map(lambda w: w.values(dtype) if is_block_scaled(w) else w, params, is_leaf=is_block_scaled)


def weight_values(w, dtype) -> jax.Array:
    """A weight as its matmul multiplies it, in ``dtype``: an array cast, a ``Quantized`` one
    rounded to its format (straight-through), a ``BlockScaled`` one decoded."""
    if isinstance(w, BlockScaled):
        return w.values(dtype)
    if isinstance(w, Quantized):
        return w.values().astype(dtype)
    return w.astype(dtype)


def operands(x: jax.Array, w) -> tuple[jax.Array, jax.Array]:
    """A matmul's input and weight as it computes them: both quantised when w is ``Quantized``."""
    return (activation(x) if isinstance(w, Quantized) else x), weight_values(w, x.dtype)
