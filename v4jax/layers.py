"""Small shared pieces: RMSNorm, linear layers in the checkpoint's [out, in] layout, and RoPE.

RoPE in DeepSeek-V4 rotates *interleaved pairs* (channels 2i, 2i+1) of the *last* ``rope_dim``
channels of each head, not the rotate-half layout. Compressed layers (CSA/HCA) use
``compress_rope_theta`` with the YaRN frequency blend; sliding-window layers use ``rope_theta``
unscaled. There is no YaRN attention temperature.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from v4jax.config import SWA, ModelConfig
from v4jax.quant import operands

F32 = jnp.float32


@functools.partial(jax.checkpoint, static_argnums=(2,))
def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in fp32 and cast back to x's dtype.

    Checkpointed: the backward pass recomputes the fp32 normalised values from x instead of keeping
    them (in a scanned bf16 training step they were fp32 residuals of the queries' and the
    hidden state's shape, copied into and out of the scan's stacks)."""
    xf = x.astype(F32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(F32)
    return y.astype(x.dtype)


def linear(x: jax.Array, w) -> jax.Array:
    """x [..., in] times a weight stored as [out, in] (the checkpoint layout), in x's dtype. A
    ``v4jax.quant.Quantized`` weight (``train.precision``) quantises itself and x first."""
    x, w = operands(x, w)
    return jnp.einsum("...i,oi->...o", x, w)


def linear_f32(x: jax.Array, w: jax.Array) -> jax.Array:
    """The same in fp32 (router, compressor, mHC and the head run in fp32): both sides upcast, or,
    when both are bf16, taken as they are with fp32 accumulation. The products of bf16 numbers are
    exact in fp32, so that is the same sum, and it runs on bf16 tensor cores without an fp32 copy of
    the weight: decoding at batch 32 on an H100 spent 0.38 ms of 3.1 in the compressors' weight
    converts and fp32 GEMMs."""
    if x.dtype == w.dtype == jnp.bfloat16:
        return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=F32)
    return jnp.einsum("...i,oi->...o", x.astype(F32), w.astype(F32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``jnp.einsum(eq, a, b)`` accumulated and returned in fp32, whose backward pass rounds the
    cotangent to the operands' dtype first (as flash attention keeps its softmax gradient in bf16).
    With bf16 operands the gradient products are then bf16 GEMMs; autodiff would feed them the fp32
    cotangent and run them in fp32 (TF32 on a GPU): half the rate, twice the bytes. With fp32
    operands this is the plain fp32 einsum."""
    return jnp.einsum(eq, a, b, preferred_element_type=F32)


def _einsum_f32_fwd(eq, a, b):
    return einsum_f32(eq, a, b), (a, b)


def _einsum_f32_bwd(eq, res, g):
    a, b = res
    _, vjp = jax.vjp(lambda a, b: jnp.einsum(eq, a, b), a, b)
    return vjp(g.astype(jnp.result_type(a, b)))


einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


# --------------------------------------------------------------------------------------------------
# RoPE


def rope_frequencies(config: ModelConfig, layer: int) -> jax.Array:
    """Per-pair angular frequencies θ_i (i < rope_dim/2) for the given layer (L is the MTP layer)."""
    rope_dim = config.qk_rope_head_dim
    compressed = config.layer_type(layer) != SWA
    base = config.compress_rope_theta if compressed else config.rope_theta
    theta = 1.0 / (base ** (jnp.arange(0, rope_dim, 2, dtype=F32) / rope_dim))
    if not compressed or config.rope_scaling is None:
        return theta
    ys = config.rope_scaling

    def correction_dim(rotations: float) -> float:
        # the pair index whose wavelength covers `rotations` turns over the original context
        return rope_dim * math.log(ys.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(base)
        )

    low = max(math.floor(correction_dim(ys.beta_fast)), 0)
    high = min(math.ceil(correction_dim(ys.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp, as the reference does
    ramp = jnp.clip((jnp.arange(rope_dim // 2, dtype=F32) - low) / (high - low), 0.0, 1.0)
    return theta * (1.0 - ramp) + (theta / ys.factor) * ramp


def rope_angles(freqs: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables [..., rope_dim/2] (fp32) for integer positions [...]."""
    phase = positions.astype(F32)[..., None] * freqs
    return jnp.cos(phase), jnp.sin(phase)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, inverse: bool = False) -> jax.Array:
    """Rotate the last 2*cos.shape[-1] channels of x in interleaved pairs, in fp32.

    x: [b, s, ..., c]; cos/sin: [b, s, r/2], broadcast over the axes between s and c.
    ``inverse`` rotates by -φ (used to de-rotate the attention output).
    """
    r = 2 * cos.shape[-1]
    extra = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * (extra) + cos.shape[2:])
    sin = sin.reshape(cos.shape)
    if inverse:
        sin = -sin
    nope, rope = x[..., :-r], x[..., -r:].astype(F32)
    a, b = rope[..., 0::2], rope[..., 1::2]
    rotated = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(rope.shape)
    return jnp.concatenate([nope, rotated.astype(x.dtype)], axis=-1)
