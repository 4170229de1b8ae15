"""Bad input gives a clear error naming the problem, never a silent wrong result."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from tests.helpers import CONFIGS, write_checkpoint
from v4jax.convert.names import tree_paths
from v4jax.convert.safetensors_io import CheckpointError
from v4jax.model import init_params

CONFIG = CONFIGS["a"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return v4jax.from_pretrained(write_checkpoint(tmp_path_factory.mktemp("ok"), CONFIG), dtype="float32")


@pytest.mark.parametrize("tokens, message", [
    (np.array([[1, 2, CONFIG.vocab_size]]), "outside the vocabulary"),
    (np.array([[1, -1, 3]]), "outside the vocabulary"),
    (np.array([1, 2, 3]), r"shape \[batch, seq\]"),
    (np.zeros((1, 2, 3), int), r"shape \[batch, seq\]"),
    (np.array([[1.0, 2.0]]), "integer"),
    (np.zeros((1, 0), int), "empty"),
    (np.zeros((0, 5), int), "empty"),
])
def test_bad_tokens(model, tokens, message):
    with pytest.raises(ValueError, match=message):
        model.logits(tokens)


def test_bad_positions_shape(model):
    with pytest.raises(ValueError, match="positions"):
        model.logits(np.zeros((1, 4), int), positions=np.zeros((1, 3), int))


def test_checkpoint_load_roundtrip(model):
    """The written checkpoint loads back to exactly the tree it came from."""
    want = init_params(CONFIG, seed=0)
    for (path, a), (_, b) in zip(tree_paths(model.params), tree_paths(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def test_mismatched_checkpoint_reports_every_problem(tmp_path):
    def edit(t):
        t["layers.0.attn.wq_a.weight"] = t["layers.0.attn.wq_a.weight"][:, :-1]  # wrong shape
        del t["layers.1.ffn.experts.3.w2.weight"]  # missing
        t["layers.0.attn.extra.weight"] = np.zeros(3, np.float32)  # unexpected
        t["norm.weight"] = t["norm.weight"].astype(np.int32)  # wrong dtype

    directory = write_checkpoint(tmp_path / "bad", CONFIG, edit)
    with pytest.raises(CheckpointError) as info:
        v4jax.from_pretrained(directory, dtype="float32")
    text = str(info.value)
    for name in ("layers.0.attn.wq_a.weight", "layers.1.ffn.experts.3.w2.weight", "layers.0.attn.extra.weight",
                 "norm.weight"):
        assert name in text


def test_config_that_does_not_match_the_tensors(tmp_path):
    directory = write_checkpoint(tmp_path / "c", CONFIG)
    (directory / "config.json").write_text(json.dumps(CONFIG.replace(hidden_size=48).to_release_dict()))
    with pytest.raises(CheckpointError, match="shape"):
        v4jax.from_pretrained(directory, dtype="float32")


def test_truncated_file_names_the_file(tmp_path):
    directory = write_checkpoint(tmp_path / "t", CONFIG)
    f = directory / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        v4jax.from_pretrained(directory, dtype="float32")


def test_bad_paths_and_dtypes(tmp_path):
    with pytest.raises(FileNotFoundError):
        v4jax.from_pretrained(tmp_path / "missing")
    directory = write_checkpoint(tmp_path / "d", CONFIG)
    with pytest.raises(ValueError, match="dtype"):
        v4jax.from_pretrained(directory, dtype="float16")


def test_model_without_mtp_says_so(tmp_path):
    config = CONFIG.replace(num_nextn_predict_layers=0)
    m = v4jax.from_pretrained(write_checkpoint(tmp_path / "n", config), dtype="float32")
    with pytest.raises(ValueError, match="no MTP block"):
        m.mtp_logits(np.zeros((1, 4), int))


@pytest.fixture(scope="module")
def wide():
    """A model whose vocabulary (40000) no int8, uint8 or int16 can state, and 64 positions."""
    return v4jax.Model.init(CONFIG.replace(vocab_size=40000, max_position_embeddings=64), seed=0)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int64])
def test_narrow_and_wide_token_dtypes_are_checked_at_their_width(wide, dtype):
    """Valid ids in any integer dtype give the int32 logits (a vocabulary check in the tokens' own
    dtype wrapped 40000 around and refused them), on the host and on the device."""
    tokens = np.array([[5, 100, 3, 120]])
    want = np.asarray(wide.logits(tokens.astype(np.int32)))
    np.testing.assert_array_equal(np.asarray(wide.logits(tokens.astype(dtype))), want)
    np.testing.assert_array_equal(np.asarray(wide.logits(jnp.asarray(tokens.astype(dtype)))), want)


def test_ids_past_int32_are_refused_not_wrapped(wide):
    """2**32 + 1 would become token 1 in an int32 cast."""
    with pytest.raises(ValueError, match=f"token id {2**32 + 1} at \\(0, 2\\) is outside the vocabulary"):
        wide.logits(np.array([[5, 6, 2**32 + 1]], np.int64))


@pytest.mark.parametrize("positions, message", [
    (np.array([[0, 1, -1, 3]]), "position -1 at \\(0, 2\\) is outside max_position_embeddings"),
    (np.array([[0, 1, 64, 3]]), "position 64 at \\(0, 2\\) is outside max_position_embeddings"),
    (np.array([[0.0, 1, 2, 3]]), "positions must be integers"),
])
def test_positions_outside_max_position_embeddings(wide, positions, message):
    with pytest.raises(ValueError, match=message):
        wide.logits(np.ones((1, 4), int), positions=positions)


def test_rows_longer_than_max_position_embeddings(wide):
    with pytest.raises(ValueError, match="65 positions per row, more than the model's max_position_embeddings=64"):
        wide.logits(np.ones((1, 65), int))
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        wide.generate([[5] * 60], max_new_tokens=5)

