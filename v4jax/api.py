"""The public entry points: ``v4jax.from_pretrained`` and ``v4jax.Model``."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.config import ModelConfig
from v4jax.model import forward, init_params

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported: use one of {sorted(_DTYPES)}")
        return jnp.dtype(_DTYPES[dtype])
    dt = jnp.dtype(dtype)
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype={dt} is not supported: use float32 or bfloat16")
    return dt


@functools.partial(jax.jit, static_argnames=("config", "dtype", "mtp"))
def _run(params, tokens, positions, segment_ids, *, config, dtype, mtp):
    out = forward(params, tokens, config, positions=positions, segment_ids=segment_ids, dtype=dtype, mtp=mtp)
    return out["mtp_logits"] if mtp else out["logits"]


@dataclasses.dataclass
class Model:
    """A DeepSeek-V4 model: its config, its parameter tree and the compute dtype.

    ``logits(tokens)`` maps int tokens [batch, seq] to float32 logits [batch, seq, vocab];
    ``mtp_logits(tokens)`` gives the MTP head's logits [batch, seq - 1, vocab], where entry t
    predicts token t + 2.
    """

    config: ModelConfig
    params: dict
    dtype: jnp.dtype = jnp.dtype(jnp.float32)

    @classmethod
    def init(cls, config: ModelConfig, seed: int = 0, dtype="float32") -> Model:
        """A randomly initialised model (see ``v4jax.model.init_params`` for the initialisation)."""
        dt = _dtype(dtype)
        return cls(config, init_params(config, seed, dt), dt)

    @property
    def has_mtp(self) -> bool:
        return "mtp" in self.params

    def _check(self, tokens, positions, segment_ids):
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [batch, seq], got shape {tuple(tokens.shape)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
        if tokens.shape[1] == 0:
            raise ValueError("tokens is empty: seq must be at least 1")
        host = np.asarray(tokens)
        bad = (host < 0) | (host >= self.config.vocab_size)
        if bad.any():
            i = tuple(int(v) for v in np.argwhere(bad)[0])
            raise ValueError(f"token id {int(host[i])} at {i} is outside the vocabulary [0, {self.config.vocab_size})")
        for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
            if arr is not None and tuple(jnp.shape(arr)) != tuple(tokens.shape):
                raise ValueError(f"{name} must have the tokens' shape {tuple(tokens.shape)}, got {tuple(jnp.shape(arr))}")
        return tokens.astype(jnp.int32)

    def logits(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        """tokens [batch, seq] -> logits [batch, seq, vocab] (float32). Packed rows: pass the
        per-document ``positions`` and ``segment_ids`` (both [batch, seq])."""
        tokens = self._check(tokens, positions, segment_ids)
        return _run(self.params, tokens, positions, segment_ids, config=self.config, dtype=self.dtype, mtp=False)

    def mtp_logits(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        """tokens [batch, seq] -> MTP logits [batch, seq - 1, vocab]: entry t predicts token t + 2."""
        if not self.has_mtp:
            raise ValueError("this model has no MTP block (num_nextn_predict_layers is 0, or the checkpoint "
                             "was saved without mtp.* tensors, as transformers does)")
        tokens = self._check(tokens, positions, segment_ids)
        out = _run(self.params, tokens, positions, segment_ids, config=self.config, dtype=self.dtype, mtp=True)
        return out[:, :-1]


def from_pretrained(path, dtype="bfloat16", mesh: jax.sharding.Mesh | None = None) -> Model:
    """Load a model from a directory: a safetensors checkpoint or a v4jax Orbax checkpoint.

    * safetensors: ``config.json`` and ``*.safetensors`` (sharded through
      ``model.safetensors.index.json`` or not), in the release's tensor layout or the one
      ``transformers``' ``save_pretrained`` writes; F32/BF16 tensors, FP8 weights with 128×128 block
      scales and packed FP4 experts (E8M0 or F32 scales) are read, the quantised ones dequantised
      exactly.
    * Orbax: a directory written by ``python -m v4jax.convert to-orbax`` (recognised by its
      ``v4jax_checkpoint.json``), restored with Orbax straight onto the devices.

    ``dtype`` is the compute dtype ("float32" for parity, "bfloat16" for speed); fp32-kept tensors
    (mHC, sinks, position and router biases) stay fp32. With ``mesh`` the parameters are placed on
    its devices: sharded by ``v4jax.parallel``'s logical-axis rules when the mesh has the axes
    (data, fsdp, expert, tensor) (e.g. from ``v4jax.parallel.make_mesh``), replicated on any other
    mesh. A checkpoint without ``mtp.*`` tensors loads without the MTP block,
    with a warning (safetensors) or silently (Orbax, where the conversion warned).
    """
    from v4jax.convert.load import load_checkpoint  # noqa: PLC0415
    from v4jax.convert.orbax_io import is_orbax_checkpoint, read_marker, restore_params  # noqa: PLC0415

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory with config.json and *.safetensors, nor a v4jax "
                                "Orbax checkpoint")
    config = ModelConfig.from_json(path / "config.json")
    dt = _dtype(dtype)
    if is_orbax_checkpoint(path):
        from v4jax.model import param_specs  # noqa: PLC0415

        specs = param_specs(config, dt)
        if not read_marker(path).get("has_mtp", True):
            specs.pop("mtp", None)
        return Model(config, restore_params(path, specs, None if mesh is None else _placement(specs, mesh, config)), dt)
    params, _ = load_checkpoint(path, config, dt)
    if mesh is None:
        return Model(config, jax.tree.map(jnp.asarray, params), dt)
    return Model(config, jax.device_put(params, _placement(params, mesh, config)), dt)


def _placement(params, mesh: jax.sharding.Mesh, config):
    """Rule-based shardings on a v4jax mesh; one replicated sharding on any other mesh."""
    from v4jax.parallel import MESH_AXES, param_shardings  # noqa: PLC0415

    if set(MESH_AXES) <= set(mesh.axis_names):
        return param_shardings(params, mesh, config)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
