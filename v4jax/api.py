"""The public entry points: ``v4jax.from_pretrained`` and ``v4jax.Model``."""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.config import ModelConfig
from v4jax.model import forward, init_params, param_specs, stored_specs
from v4jax.multihost import is_writer
from v4jax.parallel import ParallelConfig, adopt_mesh, expert_axes
from v4jax.quant import dequantized, holds_block_scaled
from v4jax.scan import unstack_layers
from v4jax.schema import param_shardings
from v4jax.tokenizer import load_tokenizer, text_prompt

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


@functools.partial(jax.jit, static_argnames=("config", "dtype", "mtp", "parallel", "mesh"))
def _run(params, tokens, positions, segment_ids, engram_ids, *, config, dtype, mtp, parallel, mesh):
    out = forward(params, tokens, config, positions=positions, segment_ids=segment_ids, dtype=dtype, mtp=mtp,
                  parallel=parallel, mesh=mesh, engram_ids=engram_ids)
    return out["mtp_logits"] if mtp else out["logits"]


def _inference_parallel(mesh, parallel: ParallelConfig | None) -> ParallelConfig:
    """The settings a model runs with: as given, or on a mesh with an expert axis the capacity
    dispatch with room for every token (capacity factor = expert-parallel devices), so nothing drops."""
    if parallel is not None:
        return parallel
    n_ep = int(np.prod([mesh.shape[a] for a in expert_axes(mesh)])) if mesh is not None else 1
    return ParallelConfig(capacity_factor=float(max(2, n_ep)))


def _check_range(values, what: str, low: int, high: int, name: str) -> None:
    """Refuse a value of ``values`` outside [low, high), naming it and its index. The minimum and
    maximum are taken in the values' own dtype (exact for any integer width) and compared as Python
    ints; under jit the values are not known and nothing is checked."""
    if isinstance(values, jax.core.Tracer):
        return
    values = values if isinstance(values, jax.Array) else np.asarray(values)
    if not jnp.issubdtype(values.dtype, jnp.integer):
        raise ValueError(f"{what}s must be integers, got dtype {values.dtype}")
    if values.size == 0 or (low <= int(values.min()) and int(values.max()) < high):
        return
    host = np.asarray(values)
    i = tuple(int(v) for v in np.argwhere((host < low) | (host >= high))[0])
    raise ValueError(f"{what} {int(host[i])} at {i} is outside {name} [{low}, {high})")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"],
                   meta_fields=["config", "dtype", "mesh", "parallel", "tokenizer_name"])
@dataclasses.dataclass
class Model:
    """A DeepSeek-V4 model: its config, its parameter tree, the compute dtype, and where it runs.

    ``logits(tokens)`` maps int tokens [batch, seq] to float32 logits [batch, seq, vocab];
    ``mtp_logits(tokens)`` gives the MTP head's logits [batch, seq - 1, vocab], where entry t
    predicts token t + 2. Both work on host or device arrays and inside ``jax.jit``. A Model is a
    pytree (its parameters are the leaves), so it can be passed to a jitted function:
    ``jax.jit(Model.logits)(model, tokens)``, which also works in a multi-host job, where a closure
    over ``model`` cannot (its parameters are on devices the process does not own). On a ``mesh``
    the parameters are sharded by v4jax's rules and the MoE runs expert-parallel over the mesh's
    ``expert`` axis; ``parallel`` (a ``v4jax.parallel.ParallelConfig``) picks the MoE dispatch,
    the grouped-matmul backend and the chunk sizes. ``tokenizer_name`` is the tokenizer the model
    was trained with, where the checkpoint says (``from_run``, ``Model.save``): text prompts and
    chat use it by default.
    """

    config: ModelConfig
    params: dict
    dtype: jnp.dtype = jnp.dtype(jnp.float32)
    mesh: jax.sharding.Mesh | None = None
    parallel: ParallelConfig | None = None
    tokenizer_name: str | None = None  # "deepseek" or "bytes" where known (a train.py run, Model.save)

    def __post_init__(self):
        if self.mesh is not None:
            self.mesh = adopt_mesh(self.mesh)
        self.parallel = _inference_parallel(self.mesh, self.parallel)

    @classmethod
    def init(cls, config: ModelConfig, seed: int = 0, dtype="float32", mesh=None, parallel=None) -> Model:
        """A randomly initialised model (see ``v4jax.model.Transformer`` for the initialisation)."""
        dt = _dtype(dtype)
        model = cls(config, init_params(config, seed, dt), dt, mesh, parallel)
        if model.mesh is not None:
            model.params = jax.device_put(model.params, param_shardings(model.params, model.mesh, config))
        return model

    @property
    def has_mtp(self) -> bool:
        return "mtp" in self.params

    @property
    def quantized(self) -> bool:
        """Whether some weights are kept as the checkpoint stores them, in FP8/FP4 (``BlockScaled``)."""
        return holds_block_scaled(self.params)

    def _check(self, tokens, positions, segment_ids):
        """Shapes, dtypes and (outside jit) values of the inputs -> tokens as int32.

        Values are checked at the inputs' own width before the cast: ``jnp.asarray`` would wrap an
        int64 id of 2**32 + 1 to 1, and a comparison in int8 cannot even state the vocabulary size."""
        if not isinstance(tokens, jax.Array):
            tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [batch, seq], got shape {tuple(tokens.shape)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
        if tokens.size == 0:
            raise ValueError(f"tokens is empty (shape {tuple(tokens.shape)}): batch and seq must be at least 1")
        for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
            if arr is not None and tuple(jnp.shape(arr)) != tuple(tokens.shape):
                raise ValueError(f"{name} must have the tokens' shape {tuple(tokens.shape)}, "
                                 f"got {tuple(jnp.shape(arr))}")
        limit = self.config.max_position_embeddings
        if positions is None and tokens.shape[1] > limit:
            raise ValueError(f"tokens has {tokens.shape[1]} positions per row, more than the model's "
                             f"max_position_embeddings={limit}")
        _check_range(tokens, "token id", 0, self.config.vocab_size, "the vocabulary")
        if positions is not None:
            _check_range(positions, "position", 0, limit, "max_position_embeddings")
        return jnp.asarray(tokens).astype(jnp.int32)

    def _logits(self, tokens, positions, segment_ids, engram_ids, mtp: bool):
        tokens = self._check(tokens, positions, segment_ids)
        if self.config.engram is not None and engram_ids is None:
            if isinstance(tokens, jax.core.Tracer):
                raise ValueError("a model with Engram needs engram_ids under jax.jit (its rows are hashed on "
                                 "the host): pass v4jax.engram.Hasher(model.config)(tokens, segment_ids)")
            from v4jax.engram import Hasher  # noqa: PLC0415

            seg = jnp.zeros(tokens.shape, jnp.int32) if segment_ids is None else segment_ids
            engram_ids = jnp.asarray(Hasher(self.config)(jax.device_get(tokens), jax.device_get(seg)))
        return _run(self.params, tokens, positions, segment_ids, engram_ids, config=self.config, dtype=self.dtype,
                    mtp=mtp, parallel=self.parallel, mesh=self.mesh)

    def logits(self, tokens, positions=None, segment_ids=None, engram_ids=None) -> jax.Array:
        """tokens [batch, seq] -> logits [batch, seq, vocab] (float32). Packed rows: pass the
        per-document ``positions`` and ``segment_ids`` (both [batch, seq]). A model with Engram
        hashes its rows on the host unless ``engram_ids`` are given (they must be, under jit)."""
        return self._logits(tokens, positions, segment_ids, engram_ids, mtp=False)

    def mtp_logits(self, tokens, positions=None, segment_ids=None, engram_ids=None) -> jax.Array:
        """tokens [batch, seq] -> MTP logits [batch, seq - 1, vocab]: entry t predicts token t + 2."""
        if not self.has_mtp:
            raise ValueError("this model has no MTP block (num_nextn_predict_layers is 0, or the checkpoint "
                             "was saved without mtp.* tensors, as transformers does)")
        return self._logits(tokens, positions, segment_ids, engram_ids, mtp=True)[:, :-1]

    def generate(self, prompts, max_new_tokens: int, temperature=1.0, top_p=1.0, top_k=0, seed=0,
                 stop_tokens=None, tokenizer=None, on_tokens=None, fp8_cache: bool = False, speculative=None,
                 stats: dict | None = None, stream_every: int = 16) -> list[list[int]]:
        """New tokens for each prompt: a list of token lists (``v4jax.generate.generate``).

        ``prompts``: a list of token-id lists, or of strings (encoded with ``tokenizer``: a name,
        "deepseek" or "bytes", or an object with ``encode``; default: the DeepSeek-V4 tokenizer for
        a model with its vocabulary). ``temperature`` 0 is greedy; ``top_k`` 0 is off; each sampling
        setting is one value or a list of one per prompt. ``stop_tokens`` default to EOS (1) and are
        not included. ``on_tokens(tokens)`` streams each position's tokens (None for rows without
        one), in bursts each ``stream_every`` steps (the steps between run on the device).
        ``fp8_cache``: the compressed cache's non-RoPE channels in FP8, as the official inference
        keeps them (about 0.6 x its bytes; ``v4jax.decode.init_cache``). ``speculative="mtp"``: the
        MTP block drafts a token each step and the main model verifies it (same greedy output, the
        same distribution when sampling); ``stats`` (a dict) then receives the acceptance rate.
        """
        from v4jax.generate import generate  # noqa: PLC0415

        if not isinstance(prompts, (list, tuple)):
            raise ValueError("prompts must be a list of prompts (token-id lists or strings); for one prompt "
                             "pass [prompt]")
        if any(isinstance(p, str) for p in prompts):
            tok = self.tokenizer(tokenizer)
            prompts = [text_prompt(tok, p) if isinstance(p, str) else p for p in prompts]
        return generate(self.params, self.config, prompts, max_new_tokens, temperature=temperature,
                        top_p=top_p, top_k=top_k, seed=seed, stop_tokens=stop_tokens, dtype=self.dtype,
                        on_tokens=on_tokens, mesh=self.mesh, fp8_cache=fp8_cache, speculative=speculative,
                        stats=stats, stream_every=stream_every)

    def chat(self, messages, mode: str = "chat", max_new_tokens: int = 512, temperature=1.0, top_p=1.0, top_k=0,
             seed=0, tokenizer=None, fp8_cache: bool = False, speculative=None, on_tokens=None) -> dict:
        """One reply to a conversation in the V4 chat format (``v4jax.chat``): ``messages`` are dicts
        with ``role`` (system, user, assistant) and ``content``; ``mode`` is "chat", "think" or
        "think_max". Returns ``content``, ``reasoning_content`` (None in chat mode), ``finished``
        (the reply ended with EOS rather than at ``max_new_tokens``) and the reply's ``tokens``.
        ``fp8_cache``, ``speculative`` and ``on_tokens`` as in ``generate``; with ``speculative`` the
        reply also has ``acceptance_rate``."""
        from v4jax.chat import EOS_ID, encode_chat_tokens, parse_completion_tokens  # noqa: PLC0415

        tok = self.tokenizer(tokenizer)
        prompt = encode_chat_tokens(messages, tok, mode)
        stats: dict = {}
        new = self.generate([prompt], max_new_tokens, temperature, top_p, top_k, seed, fp8_cache=fp8_cache,
                            speculative=speculative, stats=stats, on_tokens=on_tokens)[0]
        if len(new) < max_new_tokens:  # it stopped at EOS (which generate leaves out)
            new = new + [EOS_ID]
        reply = {**parse_completion_tokens(new, tok, mode), "tokens": new}
        return reply | ({"acceptance_rate": stats["acceptance_rate"]} if speculative else {})

    def tokenizer(self, tokenizer=None):
        """A tokenizer object: the named one ("deepseek" or "bytes"), ``tokenizer`` itself if it is
        an object (with ``encode``/``decode``), or by default the model's own (``tokenizer_name``;
        the DeepSeek-V4 tokenizer for a model without one, e.g. a released checkpoint). Refused when
        its ids do not fit the model's vocabulary."""

        name = tokenizer or self.tokenizer_name or "deepseek"
        tok = load_tokenizer(name) if isinstance(name, str) else tokenizer
        if tok.vocab_size > self.config.vocab_size:
            raise ValueError(f"the tokenizer {getattr(tok, 'name', tok)!r} has {tok.vocab_size} ids, more than the "
                             f"model's vocab_size {self.config.vocab_size}: use the tokenizer the model was trained "
                             "with (tokenizer='bytes' for the byte-level configs; v4jax-generate --tokenizer bytes), "
                             "or pass prompts as token-id lists")
        return tok

    def save(self, directory, overwrite: bool = False) -> Path:
        """Write the model as a v4jax Orbax checkpoint directory (config.json, in the release's style
        where that can hold the config and else the HF style, and the parameters in the release's
        names): what ``from_pretrained`` loads and ``python -m v4jax.convert
        to-safetensors`` exports. The directory appears only when complete. In a multi-host job
        every process calls it, with a ``directory`` every host can reach (a shared filesystem):
        each writes its parameter shards and process 0 the rest. Weights kept quantised
        (``from_pretrained(..., quantized=True)``) are written as they are held, codes and scales."""
        import orbax.checkpoint as ocp  # noqa: PLC0415

        from v4jax.config import ConfigError  # noqa: PLC0415
        from v4jax.convert.names import OFFICIAL  # noqa: PLC0415
        from v4jax.convert.orbax_io import PARAMS, atomic_output_dir, write_marker  # noqa: PLC0415
        from v4jax.convert.safetensors_to_orbax import HF_STYLE, RELEASE_STYLE, config_dict  # noqa: PLC0415

        params = unstack_layers(self.params, self.config)  # the checkpoint layout is per layer
        try:
            style, config_json = RELEASE_STYLE, config_dict(self.config, RELEASE_STYLE)
        except ConfigError:  # ratios the release's style cannot say (it reads 4 as CSA): the HF style
            style, config_json = HF_STYLE, config_dict(self.config, HF_STYLE)
        with atomic_output_dir(directory, overwrite) as tmp:
            with ocp.StandardCheckpointer() as ckpt:
                ckpt.save(tmp / PARAMS, params)
                ckpt.wait_until_finished()
            if is_writer():
                (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
                write_marker(tmp, config_style=style, source_layout=OFFICIAL, dtype=jnp.dtype(self.dtype).name,
                             has_mtp=self.has_mtp, tokenizer=self.tokenizer_name, quantized=self.quantized)
        return Path(directory)


def from_run(workdir, step: int | None = None, dtype=None, mesh: jax.sharding.Mesh | None = None,
             parallel: ParallelConfig | None = None) -> Model:
    """The model of a ``train.py`` run: its checkpoint (the newest that restores, or ``step``).

    ``dtype``: the compute dtype; by default the one the run trained in (``train.dtype``: the tiny
    CPU configs train in float32, so their logits are the training run's). The model knows the
    run's tokenizer (``Model.tokenizer_name``), so text prompts and chat use it. ``mesh`` and
    ``parallel`` as in ``from_pretrained``.
    """
    from v4jax.trainer import restore_run  # noqa: PLC0415

    mesh = None if mesh is None else adopt_mesh(mesh)
    run = restore_run(workdir, step, mesh)
    if run is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: pass a train.py --workdir")
    dt = _dtype(run["train"].dtype if dtype is None else dtype)
    specs = param_specs(run["config"], dt)  # each leaf's dtype at this compute dtype (fp32-kept ones stay)
    params = jax.tree.map(lambda a, s: a.astype(s.dtype), unstack_layers(run["state"]["params"], run["config"]),
                          specs)
    if mesh is not None:
        params = jax.device_put(params, param_shardings(params, mesh, run["config"]))
    return Model(run["config"], params, dt, mesh, parallel, tokenizer_name=run["data"].tokenizer)


def from_pretrained(path, dtype=None, mesh: jax.sharding.Mesh | None = None,
                    parallel: ParallelConfig | None = None, quantized: bool = False) -> Model:
    """Load a model from a directory: a safetensors checkpoint, a v4jax Orbax checkpoint, or a
    ``train.py`` run (its newest checkpoint) or one of its steps (``RUN/checkpoints/N``).

    * safetensors: ``config.json`` and ``*.safetensors`` (sharded through
      ``model.safetensors.index.json`` or not), in the release's tensor layout or the one
      ``transformers``' ``save_pretrained`` writes; F32/BF16 tensors, FP8 weights with 128×128 block
      scales and packed FP4 experts (E8M0 or F32 scales) are read, the quantised ones dequantised
      exactly.
    * Orbax: a directory written by ``python -m v4jax.convert to-orbax`` or ``Model.save``
      (recognised by its ``v4jax_checkpoint.json``), restored with Orbax straight onto the devices.

    * a run: as ``from_run``.

    ``dtype`` is the compute dtype, "bfloat16" or "float32" (for parity). By default bfloat16 for a
    checkpoint, as the release's weights are FP8/FP4 and bf16 (they load exactly, and the model runs
    at the accelerators' speed), and for a run the dtype it trained in.
    fp32-kept tensors (mHC, sinks, position and router biases) stay fp32. With ``mesh`` (any
    ``jax.sharding.Mesh`` whose axes are among data, fsdp, expert and tensor; the ones it does not
    name have size 1) the parameters are sharded by ``v4jax.parallel``'s rules and the model runs on
    that mesh (see ``Model``). A checkpoint without ``mtp.*`` tensors loads without the MTP block, with a warning
    (safetensors) or silently (Orbax, where the conversion warned).

    ``quantized``: keep the weights the checkpoint stores in FP8 or FP4 so in memory
    (``v4jax.quant.BlockScaled``: codes and E8M0 block scales, decoded inside each matmul's fusion),
    about a quarter (FP4) or half (FP8) of their bf16 bytes: the release's V4-Flash then takes about
    its files' size. An Orbax directory written from such a model (``Model.save``, ``v4jax-convert
    to-orbax --keep-quantized``) loads quantised as stored; without ``quantized`` it is decoded
    to ``dtype`` on the devices.
    """
    from v4jax.convert.load import load_checkpoint  # noqa: PLC0415
    from v4jax.convert.orbax_io import (  # noqa: PLC0415
        is_orbax_checkpoint,
        read_marker,
        restore_params,
        stored_formats,
    )
    from v4jax.workdir import find_run  # noqa: PLC0415

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory with config.json and *.safetensors, a v4jax "
                                "Orbax checkpoint, nor a train.py run")
    run = find_run(path)
    if run is not None:
        if quantized:
            raise ValueError(f"{path} is a train.py run, whose weights are full precision: load it without "
                             "quantized=True (quantized keeps a checkpoint's FP8/FP4 weights as stored)")
        return from_run(*run, dtype=dtype, mesh=mesh, parallel=parallel)
    config = ModelConfig.from_json(path / "config.json")
    dt = _dtype(dtype or "bfloat16")
    mesh = None if mesh is None else adopt_mesh(mesh)
    if is_orbax_checkpoint(path):
        formats = stored_formats(path)
        specs = stored_specs(config, dt, formats)
        marker = read_marker(path)
        if not marker.get("has_mtp", True):
            specs.pop("mtp", None)
        placement = None if mesh is None else param_shardings(specs, mesh, config)
        params = restore_params(path, specs, placement)
        if formats and not quantized:  # decoded on the devices, into the full-precision placement
            decode = functools.partial(dequantized, dtype=dt)
            dense = None if mesh is None else param_shardings(jax.eval_shape(decode, specs), mesh, config)
            params = jax.jit(decode, out_shardings=dense)(params)
        _check_kept(quantized, formats, path)
        return Model(config, params, dt, mesh, parallel, tokenizer_name=marker.get("tokenizer"))
    params, _ = load_checkpoint(path, config, dt, quantized=quantized)
    _check_kept(quantized, holds_block_scaled(params), path)
    if mesh is None:
        return Model(config, jax.tree.map(jnp.asarray, params), dt, None, parallel)
    return Model(config, jax.device_put(params, param_shardings(params, mesh, config)), dt, mesh, parallel)


def _check_kept(quantized: bool, kept, path) -> None:
    if quantized and not kept:
        warnings.warn(f"{path} stores no FP8/FP4 weights: quantized=True keeps nothing quantised (export one "
                      "with v4jax-convert to-safetensors --quantize)", stacklevel=3)
