"""Whole-model parity with transformers' DeepSeek-V4 (PyTorch, CPU, fp32), through from_pretrained."""

import numpy as np
import pytest

import v4jax
from tests import hf_oracle
from tests.helpers import CONFIGS, SEQ

# Max |ours - reference| / max |reference| over all logits, fp32 on both sides.
TOLERANCE = 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    config = CONFIGS[name]
    reference = hf_oracle.make_reference(config, seed=1, directory=tmp_path)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, size=(2, SEQ[name]))
    hf_oracle.assert_no_topk_ties(hf_oracle.indexer_scores(reference, tokens), config.index_topk,
                                  config.ratio[v4jax.config.CSA])
    expected = hf_oracle.reference_logits(reference, tokens)

    with pytest.warns(UserWarning, match="no mtp"):
        model = v4jax.from_pretrained(tmp_path, dtype="float32")
    got = np.asarray(model.logits(tokens))
    err = np.abs(got - expected).max() / np.abs(expected).max()
    print(f"config {name}: max relative logit error {err:.2e}")
    assert err <= TOLERANCE
