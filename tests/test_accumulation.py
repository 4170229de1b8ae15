"""Gradient accumulation (``train.grad_accum_steps``): k micro-batches in one step are one batch.

The reference is ``jax.grad`` of ``trainer.loss_fn`` over the whole batch, the loss as one batch
defines it (token-weighted cross-entropies, the balance loss's mean over rows, each layer's indexer
KL averaged over its queries). The batch packs documents of random lengths with padding, so the
micro-batches hold different numbers of tokens and of indexer queries. fp32 throughout; the sums
are reordered and the matmuls see other shapes, so values agree to rounding: losses to 1e-5
relative, expert loads exactly, each gradient leaf to 2e-4 of its largest value, or of 1e-3 of the
largest gradient anywhere for the few leaves whose gradient is the small remainder of much larger
per-token terms (the mHC gates' biases and scales: 1e-7 where the rest is 1e-2). The rounding
floor, measured: appending 1, 2 or 3 empty rows to the batch (the same loss and gradients) moves
the gradients of this sharpened model by 2.6e-5, 4.7e-5 and 6.4e-5 in that measure; k = 4 by
6.3e-5. A wrong weighting changes a leaf by a good part of itself.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from tests.helpers import CONFIGS, rel, sharpened
from tests.test_train import SMALL, losses
from v4jax.model import init_params
from v4jax.parallel import ParallelConfig, batch_sharding, make_mesh
from v4jax.schema import param_shardings, shard_like_params
from v4jax.trainer import TrainConfig, init_state, loss_fn, make_optimizer, make_train_step, update_gradients

CONFIG = CONFIGS["a"].replace(n_routed_experts=8)
B, S = 8, 40
TOL = 1e-5
GRAD_TOL = 2e-4
UPDATE_TOL = 2e-3


def packed_batch(config=CONFIG, b=B, s=S, seed=0):
    """Rows of packed documents of random lengths, each row ending in padding of random length."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, size=(b, s)).astype(np.int32)
    seg = np.zeros((b, s), np.int32)
    pos = np.zeros((b, s), np.int32)
    for r in range(b):
        t, doc = 0, 1
        end = s - int(rng.integers(0, s // 2))
        while t < end:
            n = min(int(rng.integers(4, s)), end - t)
            seg[r, t:t + n], pos[r, t:t + n] = doc, np.arange(n)
            t, doc = t + n, doc + 1
    same_next = (np.roll(seg, -1, 1) == seg) & (seg > 0)
    same_next[:, -1] = False
    same_after = (np.roll(seg, -2, 1) == seg) & (seg > 0)
    same_after[:, -2:] = False
    return {"tokens": tokens, "positions": pos, "segment_ids": seg, "targets": np.roll(tokens, -1, 1),
            "loss_mask": same_next.astype(np.float32), "mtp_targets": np.roll(tokens, -2, 1),
            "mtp_mask": same_after.astype(np.float32)}


@pytest.fixture(scope="module")
def params():
    return sharpened(init_params(CONFIG, seed=0, scan=True))


@pytest.fixture(scope="module")
def plain_params():
    """The default initialisation: for the optimizer steps, whose Newton-Schulz and Adam normalise
    each gradient leaf and so carry its rounding into the new parameters at full size."""
    return init_params(CONFIG, seed=0, scan=True)


def test_micro_batches_give_the_whole_batch_loss_and_gradients(params):
    batch = {k: jnp.asarray(v) for k, v in packed_batch().items()}
    assert len({float(batch["loss_mask"][j::4].sum()) for j in range(4)}) > 1  # micro-batches differ
    cfg = TrainConfig(steps=10)
    step = jnp.asarray(3)
    ref = jax.jit(jax.value_and_grad(loss_fn, has_aux=True, allow_int=True), static_argnums=(2, 3))
    (want_loss, (want_metrics, want_layer)), want_grads = ref(params, batch, CONFIG, cfg, step)
    assert float(want_metrics["indexer_loss"]) > 0 and float(want_metrics["mtp_loss"]) > 0
    floor = 1e-3 * max(float(np.abs(w).max()) for w in jax.tree.leaves(want_grads) if w.dtype != jax.dtypes.float0)
    got = jax.jit(update_gradients, static_argnums=(2, 3))
    for k in (1, 2, 4):
        loss, grads, metrics, loads = got(params, batch, CONFIG, TrainConfig(steps=10, grad_accum_steps=k), step)
        assert rel(loss, want_loss) <= TOL, k
        for name in ("lm_loss", "mtp_loss", "balance_loss", "indexer_loss"):
            assert rel(metrics[name], want_metrics[name]) <= TOL, (k, name)
        assert int(metrics["dropped_tokens"]) == int(want_metrics["dropped_tokens"])
        for key, layer in want_layer.items():
            np.testing.assert_array_equal(np.asarray(loads[key]), np.asarray(layer["load"]))
        for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
            w = want_grads
            for p in path:
                w = w[p.key if hasattr(p, "key") else p.idx]
            if w.dtype == jax.dtypes.float0:
                assert not np.asarray(g).any()
                continue
            err = float(np.abs(np.asarray(g, np.float64) - np.asarray(w)).max()) / max(float(np.abs(w).max()), floor)
            assert err <= GRAD_TOL, (k, jax.tree_util.keystr(path), err)


def run_steps(params, cfg, batches, parallel=None, mesh=None):
    opt = make_optimizer(cfg, CONFIG, mesh)
    state = init_state(jax.tree.map(jnp.copy, params), opt)  # the step donates its state
    if mesh is not None:
        state = jax.device_put(state, shard_like_params(state, params, mesh, CONFIG))
    step = make_train_step(CONFIG, cfg, opt, parallel, mesh)
    metrics = []
    for b in batches:
        b = {k: jax.device_put(v, batch_sharding(mesh)) if mesh is not None else jnp.asarray(v) for k, v in b.items()}
        state, m = step(state, b)
        metrics.append(jax.tree.map(np.asarray, m))
    return jax.tree.map(np.asarray, state), metrics


def reference_grads(params, batch, cfg):
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, CONFIG, cfg, jnp.asarray(0))[0], allow_int=True))
    return grad(params, {k: jnp.asarray(v) for k, v in batch.items()})


def compare_update(got, want, before, grads, tol):
    """The new parameters, each leaf to ``tol`` of its largest value; the router biases (moved by
    +-u from integer loads) exactly. Muon's Newton-Schulz and AdamW's first step carry the gradients'
    rounding into the parameters greatly enlarged (a step's polynomial lifts a gradient's smallest
    singular directions by ~1e5; AdamW with eps 1e-20 moves every element by +-lr whatever its
    size): appending 3 empty rows to the batch, the same update in exact arithmetic, moves the new
    parameters by 3.6e-2 in this measure, k = 4 by 3.5e-4 and k = 2 on a mesh by 9.1e-4. Left out:
    elements whose gradient is at the rounding level (below 1e-3 of its leaf's largest, or 1e-6 of
    the largest gradient anywhere, as the gradient test's bound allows), whose AdamW step has a sign,
    or for gradients near 1e-20 a size, that rounding decides (seen: 4e-13 beside 1.6e-4 in one mHC
    scale; 3.5e-20)."""
    top = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads) if g.dtype != jax.dtypes.float0)
    worst = 0.0
    for (path, g), w, b, gr in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want),
                                   jax.tree.leaves(before), jax.tree.leaves(grads)):
        name = jax.tree_util.keystr(path)
        if not np.issubdtype(w.dtype, np.floating) or name.endswith("['gate']['bias']"):
            np.testing.assert_array_equal(g, w, err_msg=name)
            continue
        assert np.isfinite(g).all(), name
        gr = np.abs(np.asarray(gr))
        kept = gr > max(1e-3 * gr.max(), 1e-6 * top)
        dg, dw = (np.asarray(g, np.float64) - b)[kept], (np.asarray(w, np.float64) - b)[kept]
        if dw.size:
            err = float(np.abs(dg - dw).max() / max(np.abs(np.asarray(w)).max(), 1e-30))
            assert err <= tol, (name, err)
            worst = max(worst, err)
    return worst


def test_accumulated_step_equals_the_whole_batch_step(plain_params):
    """One optimizer update (Muon, AdamW, router biases) with k = 4 and with k = 1."""
    batch = packed_batch(seed=1)
    cfg = TrainConfig(steps=10, warmup_steps=0)
    want, want_m = run_steps(plain_params, cfg, [batch])
    got, got_m = run_steps(plain_params, TrainConfig(steps=10, warmup_steps=0, grad_accum_steps=4), [batch])
    a, b = got_m[0], want_m[0]
    assert bool(a["ok"]) and rel(a["loss"], b["loss"]) <= TOL and rel(a["grad_norm"], b["grad_norm"]) <= TOL
    assert a["tokens"] == b["tokens"] and a["max_load_over_mean"] == b["max_load_over_mean"]
    assert any(np.abs(x).max() > 0 for p, x in jax.tree_util.tree_flatten_with_path(got["params"])[0]
               if jax.tree_util.keystr(p).endswith("['gate']['bias']"))  # the biases moved
    compare_update(got["params"], want["params"], jax.tree.map(np.asarray, plain_params),
                   reference_grads(plain_params, batch, cfg), UPDATE_TOL)


def test_accumulation_on_a_mesh_equals_one_device(plain_params):
    """k = 2 on data 2 x fsdp 2 x expert 2 (Muon spread over the mesh) against k = 1 on one device."""
    parallel = ParallelConfig(2, 2, 2, 1, capacity_factor=2.0)  # capacity of 2 x 2 experts' share: nothing drops
    mesh = make_mesh(parallel)
    batch = packed_batch(seed=3)
    cfg = TrainConfig(steps=10, warmup_steps=0)
    want, want_m = run_steps(plain_params, cfg, [batch])
    placed = jax.device_put(plain_params, param_shardings(plain_params, mesh, CONFIG))
    got, got_m = run_steps(placed, TrainConfig(steps=10, warmup_steps=0, grad_accum_steps=2), [batch], parallel,
                           mesh)
    a, b = got_m[0], want_m[0]
    assert int(a["dropped_tokens"]) == 0
    assert rel(a["loss"], b["loss"]) <= TOL and rel(a["grad_norm"], b["grad_norm"]) <= TOL
    compare_update(got["params"], want["params"], jax.tree.map(np.asarray, plain_params),
                   reference_grads(plain_params, batch, cfg), UPDATE_TOL)


def test_resume_with_accumulation_reproduces_the_uninterrupted_run(tmp_path):
    # 16 rows: micro-batches of 8, one per fake device
    args = ["train.steps=4", "train.checkpoint_every=2", "train.grad_accum_steps=2", *SMALL, "data.batch_size=16"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(["--workdir", str(straight), *args]) == 0
    assert train.main(["--workdir", str(split), "--stop-after-step", "2", *args]) == 0
    assert train.main(["--workdir", str(split), *args]) == 0
    a, b = losses(straight), losses(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and all(a[s] == b[s] for s in a), (a, b)
    config = json.loads((Path(straight) / "config.json").read_text())
    assert config["train"]["grad_accum_steps"] == 2


def test_accumulation_holds_one_micro_batch_of_activations():
    """Compile only (tiny.yaml, rows of 512): the step's temporaries with 16 rows in 4 micro-batches
    are those of a 4-row step plus the gradient sums (a few parameter sizes), not a 16-row step's
    (measured: 378 MiB against 374 and 1,492 MiB; the parameters are 3 MiB)."""
    from v4jax.config import ModelConfig
    from v4jax.memory import BATCH_FIELDS
    from v4jax.model import param_specs

    config = ModelConfig.from_yaml(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")
    specs = param_specs(config, scan=True)
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(specs))

    def temporaries(rows, k):
        cfg = TrainConfig(steps=10, grad_accum_steps=k)
        opt = make_optimizer(cfg, config)
        state = jax.eval_shape(lambda p: init_state(p, opt), specs)
        batch = {n: jax.ShapeDtypeStruct((rows, 512), dt) for n, dt in BATCH_FIELDS.items()}
        return make_train_step(config, cfg, opt).lower(state, batch).compile().memory_analysis().temp_size_in_bytes

    accumulated, micro, whole = temporaries(16, 4), temporaries(4, 1), temporaries(16, 1)
    assert accumulated <= micro + 3 * param_bytes, (accumulated, micro, param_bytes)
    assert accumulated < whole / 3, (accumulated, whole)
