"""eval.py and v4jax-generate on bad arguments: one `error:` line naming the argument, exit 2,
before any work. The run checkpoint is saved directly (an initialised state, no training)."""

import errno
import subprocess
import sys
from pathlib import Path

import pytest

import eval as eval_script
from tests.helpers import save_run
from v4jax.cli import generate as generate_cli

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.num_hidden_layers=2", "model.layer_types=[csa, hca]", "model.hidden_size=32",
         "model.n_routed_experts=4", "data.seq_len=48", "data.batch_size=8"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return save_run(tmp_path_factory.mktemp("run"), SMALL)


@pytest.mark.parametrize("args, message", [
    (["--batches", "-1"], "error: argument --batches: '-1': an integer >= 1"),
    (["--task", "niah", "--samples", "0"], "error: argument --samples: '0': an integer >= 1"),
    (["--task", "niah", "--lengths", "128,-5"], "error: argument --lengths: '128,-5': positive integers"),
    (["--task", "niah", "--depths", "0,2"], "error: --depths 0.0,2.0: each must lie in [0, 1]"),
])
def test_eval_refuses_bad_arguments_before_any_work(capsys, args, message):
    try:
        rc = eval_script.main(["--workdir", "nowhere", *args])
    except SystemExit as e:  # argparse's own error line
        rc = e.code
    assert rc == 2
    assert message in capsys.readouterr().err


def test_eval_niah_length_past_the_model_is_refused(workdir, capsys):
    assert eval_script.main(["--workdir", str(workdir), "--task", "niah", "--lengths", "100000000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --lengths 100000000 is longer than the model's max_position_embeddings"), err
    assert not (workdir / "niah.png").exists()


def test_eval_niah_length_past_the_haystack_is_refused(workdir, tmp_path, capsys):
    (tmp_path / "short.txt").write_text("Only a few words of haystack here.")
    assert eval_script.main(["--workdir", str(workdir), "--task", "niah", "--lengths", "256",
                             "--files", str(tmp_path / "short.txt"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: niah length 256 needs more haystack than the text holds"), err


def test_eval_unreadable_output_is_one_line(workdir, tmp_path, capsys):
    out = tmp_path / "missing-dir" / "eval.json"  # its directory does not exist: OSError on writing
    assert eval_script.main(["--workdir", str(workdir), "--batches", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    first, last = err.splitlines()[0], err.splitlines()[-1]
    assert first.startswith("jax ") and "backend cpu" in first, err  # what it ran on, said at start
    assert last.startswith("error: ") and "missing-dir" in last and "Traceback" not in err, err


def test_generate_prints_os_errors_as_one_line(monkeypatch, capsys):
    def unreadable(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", "ckpt/model-00001-of-00002.safetensors")

    monkeypatch.setattr("v4jax.from_pretrained", unreadable)
    assert generate_cli.main(["--checkpoint", "ckpt", "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == ("error: [Errno 5] Input/output error: "
                                       "'ckpt/model-00001-of-00002.safetensors'\n")


@pytest.mark.parametrize("module", ["v4jax.cli.generate", "v4jax.convert.__main__"])
def test_command_lines_start_without_jax(module):
    """`--help` must not wait seconds for jax: importing a command line's module leaves jax unloaded."""
    code = f"import sys, {module}; print(sorted(m for m in ('jax', 'flax', 'orbax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out
