"""Context parallelism (``v4jax.context``) on 8 fake CPU devices: a sequence split over the
``context`` axis gives the one-device numbers.

The batch is 8K tokens of packed documents of random lengths, so documents start and end inside
slices and cross slice boundaries, and blocks of the compressors straddle them. Tolerance (fp32):
the split reorders sums (the entries' gradients are reduce-scattered, the loss is summed per
slice), so values agree to rounding: relative error <= 1e-5 on the loss terms and logits, and on
every gradient leaf relative to the largest gradient of the model.

The gradients are compared in the dense attention stage (``train.attention: dense``), the loss
terms in both. The sparse stage's top-k is discontinuous: on one CPU (XLA's XNNPACK kernels) the
split's rounding-level changes to the indexer's scores picked other entries at near-ties, which
moved gradients by 1.4e-3 of the largest while every loss term still agreed to 1e-5; in the dense
stage the same split moves them by 1.9e-6.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import v4jax
from tests.helpers import CONFIGS, rel, write_checkpoint
from v4jax import context
from v4jax.cli.train import check_batch_split
from v4jax.config import ConfigError
from v4jax.memory import training_memory
from v4jax.model import init_params
from v4jax.parallel import ParallelConfig, ShardingError, expert_axes, make_mesh
from v4jax.schema import param_shardings
from v4jax.trainer import TrainConfig, loss_fn

# every kind of layer, MTP, two hash layers; a window and ratios that make slices of 512 tokens
# see halos from one slice back and HCA blocks that straddle slices
CONFIG = CONFIGS["a"].replace(sliding_window=32, compress_rates={"csa": 4, "hca": 64}, index_topk=16)
TRAIN = TrainConfig(steps=10)
DENSE = TrainConfig(steps=10, attention="dense")


def packed(b: int, s: int, seed: int = 0, mean_doc: int = 300) -> dict:
    """A batch of rows packed with documents of random lengths (positions restart in each)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, (b, s)).astype(np.int32)
    seg = (1 + np.cumsum(rng.random((b, s)) < 1 / mean_doc, axis=1)).astype(np.int32)
    start = np.concatenate([np.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    idx = np.arange(s)[None, :].repeat(b, 0)
    pos = (idx - np.maximum.accumulate(np.where(start, idx, 0), axis=1)).astype(np.int32)
    last = np.concatenate([seg[:, 1:] != seg[:, :-1], np.ones((b, 1), bool)], axis=1)
    nxt = np.roll(tokens, -1, 1)
    return {"tokens": tokens, "positions": pos, "segment_ids": seg, "targets": nxt,
            "loss_mask": (~last).astype(np.float32), "mtp_targets": np.roll(tokens, -2, 1),
            "mtp_mask": (~last & ~np.roll(last, -1, 1)).astype(np.float32)}


def run(params, batch, mesh=None, par=None, train=TRAIN, grads=True):
    """The training loss, its terms and (``grads``) the gradients (jitted; on ``mesh`` if given)."""
    def f(p, bt):
        if not grads:
            loss, (metrics, _) = loss_fn(p, bt, CONFIG, train, 0, par, mesh)
            return loss, metrics, None
        (loss, (metrics, _)), g = jax.value_and_grad(loss_fn, has_aux=True, allow_int=True)(
            p, bt, CONFIG, train, 0, par, mesh)
        return loss, metrics, g
    if mesh is not None:
        params = jax.device_put(params, param_shardings(params, mesh, CONFIG))
    return jax.jit(f)(params, batch)


def grads_rel(got, want) -> float:
    """max over leaves of max |got - want| / (largest |gradient| of the model)."""
    floats = [(g, w) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)) if w.dtype == jnp.float32]
    scale = max(float(jnp.max(jnp.abs(w))) for _, w in floats)
    return max(float(jnp.max(jnp.abs(g - w))) for g, w in floats) / scale


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, seed=0)


@pytest.fixture(scope="module")
def batch():
    b = packed(2, 4096)
    cut = np.arange(512, 4096, 512)  # slice boundaries with context 8
    assert np.any(b["segment_ids"][:, cut - 1] == b["segment_ids"][:, cut])  # documents cross them
    return b


@pytest.fixture(scope="module")
def single(params, batch):
    """The one-device numbers: the sparse stage's loss terms, the dense stage's and its gradients."""
    return run(params, batch, grads=False), run(params, batch, train=DENSE)


# (data, fsdp, expert, tensor, context): context 8 alone, 4 with fsdp, 2 with fsdp and expert; "+ec":
# the experts folded over expert x context (parallel.expert_over_context), one row on expert 2 x context 4
MESHES = {"c8": (1, 1, 1, 1, 8), "f2c4": (1, 2, 1, 1, 4), "f2e2c2": (1, 2, 2, 1, 2), "c8+ec": (1, 1, 1, 1, 8),
          "e2c4+ec": (1, 1, 2, 1, 4)}


@pytest.mark.parametrize("name", sorted(MESHES))
def test_training_loss_and_gradients_match_one_device(name, params, batch, single):
    shape = MESHES[name]
    par = ParallelConfig(*shape[:4], context=shape[4], capacity_factor=8.0,  # nothing can drop
                         expert_over_context=name.endswith("+ec"))
    mesh = make_mesh(par, jax.devices()[:int(np.prod(shape))])
    for stage, (want_loss, want_metrics, want_grads) in zip((TRAIN, DENSE), single):
        loss, metrics, grads = run(params, batch, mesh, par, stage, grads=want_grads is not None)
        assert int(metrics["dropped_tokens"]) == 0
        assert rel(loss, want_loss) <= 1e-5, stage.attention
        for k in ("lm_loss", "mtp_loss", "balance_loss", "indexer_loss"):
            assert rel(metrics[k], want_metrics[k]) <= 1e-5, (stage.attention, k)
        assert float(want_metrics["indexer_loss"]) > 0
        if want_grads is not None:
            assert grads_rel(grads, want_grads) <= 1e-5


def test_from_pretrained_on_a_context_mesh_gives_the_unsharded_logits(tmp_path):
    path = write_checkpoint(tmp_path / "ckpt", CONFIG)
    b = packed(2, 1001, seed=1, mean_doc=200)  # 1001 tokens: the context axis (4) does not divide them
    args = (b["tokens"], b["positions"], b["segment_ids"])
    want = v4jax.from_pretrained(path, dtype="float32").logits(*args)
    model = v4jax.from_pretrained(path, dtype="float32", mesh=jax.make_mesh((4, 2), ("context", "expert")))
    assert model.mesh.shape["context"] == 4
    assert rel(model.logits(*args), want) <= 1e-5
    prompts = [list(b["tokens"][0, :40]), list(b["tokens"][1, :25])]  # generation leaves the axis unused
    assert model.generate(prompts, 4, temperature=0) == v4jax.from_pretrained(path, dtype="float32").generate(
        prompts, 4, temperature=0)


def test_halo_rows_come_from_as_many_slices_back_as_needed():
    mesh = make_mesh(ParallelConfig(1, 1, 1, 1, 8))
    x = np.arange(16, dtype=np.int32).reshape(1, 16)  # slices of 2 rows
    for n in (1, 2, 5):
        got = jax.shard_map(lambda a: context.from_left(a, n, 8, -1), mesh=mesh, in_specs=P(None, "context"),
                            out_specs=P(None, "context"))(x)
        want = [[(2 * i - n + j if 2 * i - n + j >= 0 else -1) for j in range(n)] for i in range(8)]
        np.testing.assert_array_equal(np.asarray(got).reshape(8, n), want)


def test_training_memory_divides_over_the_context_axis():
    """Compile only: one 64K-token row on 8 devices; the temporaries with context 8 are at most a
    fifth of those with context 1. The attention's and the indexer's per-step buffers (chunk x
    heads x entry block) do not depend on the sequence and are the same in both; the chunks are set
    small so that the measure is what grows with the sequence."""
    temp = {}
    for ways, shape in ((1, (1, 1, 1, 8, 1)), (8, (1, 1, 1, 1, 8))):  # context 1: the tensor axis takes the devices
        par = ParallelConfig(*shape, remat="full", attention_chunk=128, indexer_key_chunk=2048)
        temp[ways] = training_memory(CONFIG, TRAIN, par, make_mesh(par), 1, 65536)["temp_bytes_per_device"]
    assert temp[8] <= temp[1] / 5, temp


def test_training_refuses_what_context_cannot_split():
    run = types.SimpleNamespace(train=types.SimpleNamespace(grad_accum_steps=1),
                                data=types.SimpleNamespace(batch_size=8, seq_len=1000))
    with pytest.raises(ConfigError, match="data.seq_len=1000 must be divisible by parallel.context=16"):
        check_batch_split(run, _fake_mesh(16, hosts=1))
    run.data.seq_len = 1024
    check_batch_split(run, _fake_mesh(16, hosts=2, context=4))  # 2 hosts of 8 devices: context 4 stays in one
    with pytest.raises(ConfigError, match="keep context x tensor within a host"):
        check_batch_split(run, _fake_mesh(16, hosts=2, context=16))


def test_experts_fold_over_the_context_axis_only_when_asked():
    mesh = make_mesh(ParallelConfig(1, 1, 2, 1, 4))
    assert expert_axes(mesh) == expert_axes(mesh, ParallelConfig()) == ("expert",)
    assert expert_axes(mesh, ParallelConfig(expert_over_context=True)) == ("expert", "context")
    assert expert_axes(make_mesh(ParallelConfig(1, 1, 1, 1, 8)), ParallelConfig(expert_over_context=True)) == (
        "context",)
    with pytest.raises(ShardingError, match="parallel.expert_over_context='yes': true or false"):
        ParallelConfig(expert_over_context="yes")


def _fake_mesh(n: int, hosts: int, context: int = 16):
    """A stand-in for a mesh of n devices on ``hosts`` hosts (the check reads names, shapes and each
    device's process_index): data x context, device ids in order, each host n / hosts of them."""
    devices = np.array([types.SimpleNamespace(process_index=i * hosts // n) for i in range(n)], dtype=object)
    names = ("data", "fsdp", "expert", "context", "tensor")
    shape = dict(zip(names, (n // context, 1, 1, context, 1)))
    return types.SimpleNamespace(devices=devices.reshape(tuple(shape.values())), axis_names=names, shape=shape)
