"""train.py and eval.py end to end on a very small model: resume exactness, signals, bad configs, NaNs."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eval as eval_script
import train
from tests.test_data import sha_value
from v4jax.checkpoint import CheckpointError
from v4jax.cli import train as train_cli
from v4jax.config import ConfigError
from v4jax.trainer import init_state, load_run_config, make_optimizer, make_train_step, restore_run

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.num_hidden_layers=2", "model.layer_types=[csa, hca]", "model.hidden_size=32",
         "model.n_routed_experts=4", "data.seq_len=48", "data.batch_size=8", "train.log_every=1",
         "train.eval_every=0", "--no-progress"]
OVERRIDES = SMALL[:-1]  # without --no-progress


def losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_resume_reproduces_the_uninterrupted_run(tmp_path, capsys):
    straight = tmp_path / "straight"
    assert train.main(["--workdir", str(straight), "train.steps=6", "train.checkpoint_every=3", *SMALL]) == 0
    split = tmp_path / "split"
    assert train.main(["--workdir", str(split), "--stop-after-step", "3", "train.steps=6", "train.checkpoint_every=3",
                       *SMALL]) == 0
    assert losses(split).keys() == {1, 2, 3}
    # As if a run went on, logged step 4 and half of step 5, and was killed while its checkpoint 4
    # lost a file: the resume skips the broken step and drops the log lines past step 3.
    with (split / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "loss": 0.0}) + '\n{"step": 5, "lo')
    shutil.copytree(split / "checkpoints" / "3", split / "checkpoints" / "4")
    for chunk in (split / "checkpoints" / "4" / "state" / "d").iterdir():
        chunk.unlink()
    capsys.readouterr()
    assert train.main(["--workdir", str(split), "train.steps=6", "train.checkpoint_every=3", *SMALL]) == 0
    err = capsys.readouterr().err
    assert f"warning: checkpoint {split / 'checkpoints' / '4'} cannot be read: NOT_FOUND" in err, err
    assert "renamed the broken checkpoint" in err and "resumed from step 3" in err, err
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["3", "4.broken", "6"]
    steps = [json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not (split / "train.lock").exists() and not (straight / "train.lock").exists()
    a, b = losses(straight), losses(split)
    assert sorted(a) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):  # same program, same data, same state: the same numbers
        assert a[step] == b[step], (step, a[step], b[step])
    assert a[6] < a[1]

    out = tmp_path / "eval.json"
    assert eval_script.main(["--workdir", str(straight), "--batches", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["step"] == 6 and result["main"]["perplexity"] == pytest.approx(np.exp(result["main"]["loss"]))
    assert "mtp" in result and result["main"]["tokens"] > 0

    # another model or parameter layout is refused, naming what differs (and the lock is released)
    capsys.readouterr()
    assert train.main(["--workdir", str(straight), "train.steps=7", "parallel.scan_layers=false",
                       "model.moe_intermediate_size=32", *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "(model.moe_intermediate_size: saved 64, now 32; parallel.scan_layers: saved True, now False)" in err
    assert not (straight / "train.lock").exists()

    # eval.py and from_run: a broken newest step is skipped with a warning, and refused by name
    (straight / "checkpoints" / "6" / "meta" / "metadata").write_text("{garbled")
    with pytest.warns(UserWarning, match="checkpoints/6 cannot be read"):
        assert int(restore_run(straight)["state"]["step"]) == 3
    with pytest.raises(CheckpointError, match=f"checkpoint {straight / 'checkpoints' / '6'} cannot be read"):
        restore_run(straight, 6)


def write_corpus(directory, docs):
    directory.mkdir(exist_ok=True)
    (directory / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def test_own_corpus_is_evaluated_on_documents_held_out_and_resumes_on_the_same_split(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    docs = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 4) for i in range(20)]
    write_corpus(corpus, docs)
    held = min(docs, key=sha_value)  # 5% of 20 documents: the one of lowest hash
    run = ["train.steps=4", "train.checkpoint_every=2", *OVERRIDES, f"data.path={corpus}", "train.eval_every=2",
           "train.eval_batches=2"]
    straight = tmp_path / "straight"
    assert train.main(["--workdir", str(straight), *run]) == 0  # with the progress bar
    err = capsys.readouterr().err
    assert re.search(rf"warning: data.heldout_fraction is not set: 1 of the 20 documents of {corpus} \(\d+\.\d% of "
                     r"the text\) are held out for evaluation", err), err
    assert "lm_loss=" in err, "the progress bar shows the main head's loss"
    fraction = json.loads((straight / "config.json").read_text())["data"]["heldout_fraction"]
    assert [d for d in docs if sha_value(d) < fraction] == [held]
    rows = {r["step"]: r for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())}
    assert [s for s, r in rows.items() if "eval_main_loss" in r] == [2, 4]
    # the summary at the end
    assert re.search(rf"\ntrained: steps 1-4 of 4 in \d+ s; training loss \(main head\) {rows[4]['lm_loss']:.4f} at "
                     rf"step 4; held-out loss \(main head\) {rows[4]['eval_main_loss']:.4f} at step 4\n", err), err
    assert err.endswith(f"\ncheckpoint: step 4, {straight / 'checkpoints' / '4'}\n"
                        f"metrics: {straight / 'metrics.jsonl'} (TensorBoard: {straight / 'tb'})\n"
                        f"next: v4jax-eval --workdir {straight}  |  v4jax-generate --checkpoint {straight} "
                        f"--prompt 'To be'  |  python -m v4jax.cli.plot --workdir {straight}\n"), err

    split = tmp_path / "split"
    assert train.main(["--workdir", str(split), "--stop-after-step", "2", *run, "--no-progress"]) == 0
    assert "\ntrained: steps 1-2 of 4 in " in capsys.readouterr().err
    # A document added before the resume, of a hash below the held-out one's: chosen afresh, 5% of
    # 21 documents would hold out only the new one and train on the old one. The run keeps its split.
    extra = next(t for t in (f"a late addition {i}" for i in range(10_000)) if sha_value(t) < sha_value(held))
    write_corpus(corpus, [*docs, extra])
    assert train.main(["--workdir", str(split), *run, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "resumed from step 2" in err and "heldout_fraction is not set" not in err, err
    assert json.loads((split / "config.json").read_text())["data"]["heldout_fraction"] == fraction
    assert losses(split) == losses(straight)
    # another split on resume is refused by name
    assert train.main(["--workdir", str(split), *run, "train.steps=6", "data.heldout_fraction=0.5"]) == 2
    assert f"data.heldout_fraction: saved {fraction!r}, now 0.5" in capsys.readouterr().err

    # eval.py without --files: the held-out split the run kept, with a progress bar
    out = tmp_path / "eval.json"
    assert eval_script.main(["--workdir", str(split), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    # bytes: each document is bos + its bytes + eos, and every token after bos is scored
    assert result["data"] == "held-out split" and result["main"]["tokens"] == len(held) + len(extra) + 2
    assert "perplexity: 100%" in capsys.readouterr().err


@pytest.mark.parametrize("corpus, setting", [("many", "data.heldout_fraction=0"), ("one", None)])
def test_own_corpus_without_held_out_documents_is_refused_before_training(tmp_path, capsys, corpus, setting):
    if corpus == "many":
        write_corpus(tmp_path / "corpus", [f"document {i}" for i in range(20)])
        path = tmp_path / "corpus"
    else:
        path = tmp_path / "play.txt"
        path.write_text("a single play, one document")
    workdir = tmp_path / "w"
    args = ["--workdir", str(workdir), *OVERRIDES, f"data.path={path}", "train.eval_every=2"]
    assert train.main([*args, *([setting] if setting else []), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"error: train.eval_every=2 evaluates on a held-out split, and data.path={str(path)!r} has "
                        "none (data.heldout_fraction=0): leave data.heldout_fraction unset or set it in (0, 1) for a "
                        "corpus of several documents (a .txt file is one, so is a .jsonl line), or set "
                        "train.eval_every=0 and evaluate afterwards with eval.py --files\n"), err
    assert not workdir.exists()


def test_tiny_deepseek_config_trains_with_the_deepseek_tokenizer():
    run = load_run_config(ROOT / "configs/tiny-deepseek.yaml")
    train_cli.check_config(run)  # the vocabulary holds the tokenizer's, the rows fit the positions
    assert run.data.tokenizer == "deepseek" and run.model.vocab_size == 129280
    assert run.to_dict()["data"]["tokenizer"] == "deepseek"  # kept in every checkpoint's meta (from_run reads it)
    with pytest.raises(ConfigError, match="model.vocab_size=512 is smaller than the deepseek tokenizer's"):
        train_cli.check_config(load_run_config(ROOT / "configs/tiny-deepseek.yaml", ["model.vocab_size=512"]))


def test_options_may_come_between_the_overrides():
    args = train_cli.parse_args(["train.steps=2", "--no-progress", "data.seed=1", "--workdir", "w", "train.lr=1"])
    assert args.no_progress and args.workdir == "w" and args.overrides == ["train.steps=2", "data.seed=1", "train.lr=1"]


@pytest.mark.parametrize("module", ["train", "eval", "v4jax.cli.train", "v4jax.cli.eval"])
def test_command_lines_start_without_jax(module):
    """`--help` does not wait seconds for jax: importing the command line leaves jax unloaded."""
    code = f"import sys, {module}; print(sorted(m for m in ('jax', 'flax', 'orbax', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out


def test_sigterm_saves_before_exit(tmp_path):
    workdir = tmp_path / "sig"
    proc = subprocess.Popen([sys.executable, "train.py", "--workdir", str(workdir), "train.steps=100000",
                             "train.checkpoint_every=100000", *SMALL], cwd=ROOT, env={**os.environ},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "backend cpu: " in err, err  # the start-up line: what the run uses
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= 2, err
    assert f"\ncheckpoint: step {saved[-1]}, {workdir / 'checkpoints' / str(saved[-1])}\n" in err, err
    assert not (workdir / "train.lock").exists()


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "stepz"),
    ("train.lr=-1", "train.lr"),
    ("data.tokenizer=chars", "data.tokenizer"),
    ("model.o_groups=3", "o_groups"),
    ("nonsense", "section.key=value"),
    ("train.lr=.inf", "train.lr=inf is not allowed: a finite number"),
    ("data.path=/nonexistent/corpus.txt", "data path '/nonexistent/corpus.txt' does not exist"),
    ("model.max_position_embeddings=32", "data.seq_len=48 is longer than model.max_position_embeddings=32"),
    ("train.grad_accum_steps=3", "data.batch_size=8 must be divisible by train.grad_accum_steps=3"),
    ("train.grad_accum_steps=0", "train.grad_accum_steps=0 is not allowed: an integer >= 1"),
])
def test_bad_config_is_refused_and_nothing_written(tmp_path, capsys, override, message):
    workdir = tmp_path / "w"
    assert train.main(["--workdir", str(workdir), override, *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not workdir.exists()


def test_non_finite_step_is_skipped():
    # lr=3e38 is finite, but Muon's update times it overflows float32 in a few parameters
    run = load_run_config(ROOT / "configs/tiny.yaml",
                          [o for o in SMALL if not o.startswith("--")] + ["train.lr=3e38", "train.warmup_steps=0"])
    from v4jax.model import init_params

    optimizer = make_optimizer(run.train, run.model)
    step = make_train_step(run.model, run.train, optimizer)
    b, s = 8, 48
    batch = {"tokens": jnp.ones((b, s), jnp.int32), "positions": jnp.broadcast_to(jnp.arange(s), (b, s)),
             "segment_ids": jnp.ones((b, s), jnp.int32), "targets": jnp.ones((b, s), jnp.int32),
             "loss_mask": jnp.ones((b, s)), "mtp_targets": jnp.ones((b, s), jnp.int32), "mtp_mask": jnp.ones((b, s))}
    params = init_params(run.model, 0)
    nan_norm = {**params, "norm": params["norm"].at[0].set(jnp.nan)}
    # a NaN loss: the step is skipped, the old state kept bit for bit
    state = init_state(jax.tree.map(jnp.copy, nan_norm), optimizer)  # fresh buffers: the step donates them
    before = jax.tree.map(np.asarray, state)
    state, metrics = step(state, batch)
    assert not bool(metrics["ok"]) and bool(metrics["state_finite"]) and int(state["step"]) == 1
    assert not np.isfinite(metrics["loss"])
    for key in ("params", "opt_state"):
        jax.tree.map(lambda a, c: np.testing.assert_array_equal(np.asarray(a), c), state[key], before[key])
    # a finite loss and gradient, but inf parameters after the update: not ok, and said so
    state, metrics = step(init_state(jax.tree.map(jnp.copy, params), optimizer), batch)
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    assert not bool(metrics["ok"]) and not bool(metrics["state_finite"])
    assert not all(bool(np.isfinite(np.asarray(a)).all()) for a in jax.tree.leaves(state["params"]))


def test_a_step_that_makes_the_state_non_finite_is_not_kept(tmp_path, capsys):
    workdir = tmp_path / "w"
    assert train.main(["--workdir", str(workdir), "train.lr=3e38", "train.warmup_steps=0", "train.max_bad_steps=2",
                       "train.checkpoint_every=1", "train.steps=5", *SMALL]) == 1
    err = capsys.readouterr().err
    assert ("step 1: the loss and gradient are finite but the new parameters or optimizer state are not (is "
            "train.lr too large?): that state cannot be trained on or saved; stopping; there is no checkpoint yet"
            in err), err
    assert not (workdir / "checkpoints").exists() and not (workdir / "train.lock").exists()
