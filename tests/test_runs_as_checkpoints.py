"""A train.py run is a checkpoint to every tool: from_pretrained, v4jax-generate and v4jax-convert
take a run directory or one of its steps, and the model keeps the run's tokenizer (Model.save too).
Exporting weights that are not on the FP8/FP4 grid says what it cost."""

import json

import numpy as np
import pytest

import v4jax
from tests.helpers import save_run
from v4jax.cli import generate as generate_cli
from v4jax.convert.__main__ import main as convert

SMALL = ["model.num_hidden_layers=2", "model.layer_types=[csa, hca]", "model.hidden_size=32",
         "model.n_routed_experts=4", "data.seq_len=48", "data.batch_size=8"]
TOKENS = np.array([[0, 45, 72, 101, 3, 200, 17, 9]])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return save_run(tmp_path_factory.mktemp("runs") / "tiny", SMALL, seed=3)


@pytest.fixture(scope="module")
def reference(run):
    model = v4jax.from_run(run)
    return model, np.asarray(model.logits(TOKENS))


def test_from_pretrained_takes_a_run_and_a_step(run, reference):
    model, want = reference
    assert model.dtype == np.float32 and model.tokenizer_name == "bytes"  # the run's dtype and tokenizer
    for path in (run, run / "checkpoints" / "1"):
        got = v4jax.from_pretrained(path)
        assert got.tokenizer_name == "bytes"
        np.testing.assert_array_equal(np.asarray(got.logits(TOKENS)), want)
    with pytest.raises(ValueError, match="train.py run, whose weights are full precision"):
        v4jax.from_pretrained(run, quantized=True)


def test_the_tokenizer_travels_with_the_model(run, reference, tmp_path):
    model, _ = reference
    assert model.tokenizer().name == "bytes"  # a text prompt is encoded as the run's bytes
    assert len(model.generate(["Once upon"], 3, temperature=0.0)[0]) <= 3
    model.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "v4jax_checkpoint.json").read_text())["tokenizer"] == "bytes"
    assert v4jax.from_pretrained(tmp_path / "saved").tokenizer_name == "bytes"
    anonymous = v4jax.Model(model.config, model.params)  # no record: DeepSeek's, refused for 512 ids
    with pytest.raises(ValueError, match="tokenizer 'deepseek' has 129280 ids.*--tokenizer bytes"):
        anonymous.generate(["Once"], 2)


def test_generate_cli_takes_a_run(run, capsys):
    assert generate_cli.main(["--checkpoint", str(run), "--prompt", "To be", "--max-new-tokens", "4",
                              "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.endswith("\n")
    assert out.err.startswith("jax ") and "backend cpu" in out.err  # what it runs on, said at start


def test_convert_takes_a_run(run, reference, tmp_path, capsys):
    _, want = reference
    assert convert(["to-safetensors", "--src", str(run), "--dst", str(tmp_path / "st"), "--no-progress"]) == 0
    assert convert(["to-orbax", "--src", str(run / "checkpoints" / "1"), "--dst", str(tmp_path / "orbax"),
                    "--dtype", "float32", "--no-progress"]) == 0
    capsys.readouterr()
    for out in ("st", "orbax"):  # fp32 throughout: the run's own logits
        got = v4jax.from_pretrained(tmp_path / out, dtype="float32")
        np.testing.assert_array_equal(np.asarray(got.logits(TOKENS)), want)


def test_quantising_off_grid_weights_reports_its_error(run, reference, tmp_path, capsys):
    """The printed relative RMS error per group equals the one measured on the written files."""
    model, _ = reference
    assert convert(["to-safetensors", "--src", str(run), "--dst", str(tmp_path / "q"), "--quantize", "fp8+fp4",
                    "--no-progress"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("quantisation error")][0]
    printed = dict(part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", "))
    back = v4jax.from_pretrained(tmp_path / "q", dtype="float32").params
    measured = {}
    for name, group in (("experts", "routed experts"), ("shared_experts", "shared experts")):
        err = ref = 0.0
        for layer, again in zip(model.params["layers"] + [model.params["mtp"]], back["layers"] + [back["mtp"]]):
            for w in ("w1", "w2", "w3"):
                a, b = np.asarray(layer["ffn"][name][w], np.float64), np.asarray(again["ffn"][name][w], np.float64)
                err, ref = err + np.sum((a - b) ** 2), ref + np.sum(a ** 2)
        measured[group] = (err / ref) ** 0.5
    assert measured["routed experts"] > 0.02  # FP4: lossy, and said so
    for group, value in measured.items():
        assert float(printed[group].rstrip("%")) / 100 == pytest.approx(value, abs=6e-5), (group, printed)
