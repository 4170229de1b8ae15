"""The front door: ``from_pretrained`` on any mesh, ``Model`` under ``jax.jit`` and on a mesh
(expert-parallel MoE), ``Model.save``. Sharded logits agree with the single-device ones to 2e-5
and logits inside a user's jit to 1e-6 (XLA fuses and orders sums differently in both); a saved and
reloaded model is bit-identical."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from tests.helpers import CONFIGS, rel, write_checkpoint
from v4jax.parallel import ShardingError

CONFIG = CONFIGS["a"].replace(n_routed_experts=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ck"), CONFIG)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(4, 16))


@pytest.fixture(scope="module")
def alone(checkpoint, tokens):
    model = v4jax.from_pretrained(checkpoint, dtype="float32")
    return np.asarray(model.logits(tokens)), np.asarray(model.mtp_logits(tokens))


@pytest.mark.parametrize("shape,names", [((2, 4), ("fsdp", "expert")), ((8,), ("data",)),
                                         ((2, 2, 2), ("expert", "tensor", "data"))])
def test_from_pretrained_on_a_jax_make_mesh(checkpoint, tokens, alone, shape, names):
    """Meshes from jax.make_mesh (Explicit axis types by default), naming some of v4jax's axes."""
    mesh = jax.make_mesh(shape, names)
    sizes = dict(zip(names, shape))
    model = v4jax.from_pretrained(checkpoint, dtype="float32", mesh=mesh)
    assert model.mesh.axis_names == ("data", "fsdp", "expert", "context", "tensor")
    assert dict(model.mesh.shape) == {a: sizes.get(a, 1) for a in model.mesh.axis_names}
    w1 = model.params["layers"][2]["ffn"]["experts"]["w1"]  # [experts, mlp, embed]
    want = tuple(a if sizes.get(a, 1) > 1 else None for a in ("expert", "tensor", "fsdp"))
    assert tuple(w1.sharding.spec) + (None,) * (3 - len(w1.sharding.spec)) == want
    assert rel(model.logits(tokens), alone[0]) <= 2e-5
    assert rel(model.mtp_logits(tokens), alone[1]) <= 2e-5
    hlo = jax.jit(model.logits).lower(jnp.asarray(tokens)).as_text()
    assert ("all-to-all" in hlo or "all_to_all" in hlo) == (sizes.get("expert", 1) > 1)  # expert-parallel MoE


def test_a_mesh_axis_of_another_name_is_refused(checkpoint):
    with pytest.raises(ShardingError, match="'x'.*data, fsdp, expert, context, tensor"):
        v4jax.from_pretrained(checkpoint, dtype="float32", mesh=jax.make_mesh((8,), ("x",)))


def test_logits_under_jit(checkpoint, tokens, alone):
    model = v4jax.from_pretrained(checkpoint, dtype="float32")
    run = jax.jit(lambda t: (model.logits(t), model.mtp_logits(t)))
    logits, mtp = run(jnp.asarray(tokens))
    assert rel(logits, alone[0]) <= 1e-6 and rel(mtp, alone[1]) <= 1e-6


def test_save_then_from_pretrained_gives_the_same_model(checkpoint, tokens, alone, tmp_path):
    model = v4jax.from_pretrained(checkpoint, dtype="float32")
    saved = model.save(tmp_path / "saved")
    again = v4jax.from_pretrained(saved, dtype="float32")
    assert jax.tree.structure(again.params) == jax.tree.structure(model.params)
    jax.tree.map(np.testing.assert_array_equal, again.params, model.params)
    np.testing.assert_array_equal(again.logits(tokens), alone[0])
    with pytest.raises(Exception, match="exists"):
        model.save(tmp_path / "saved")


def test_model_init_on_a_mesh_runs_there(tokens):
    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    model = v4jax.Model.init(CONFIG, seed=1, mesh=mesh)
    alone = v4jax.Model.init(CONFIG, seed=1)
    assert model.params["embed"].sharding.mesh.shape == model.mesh.shape
    assert rel(model.logits(tokens), alone.logits(tokens)) <= 2e-5
