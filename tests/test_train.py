"""train.py and eval.py end to end on a very small model: resume exactness, signals, bad configs, NaNs."""

import json
import os
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
from v4jax.trainer import init_state, load_run_config, make_optimizer, make_train_step

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.num_hidden_layers=2", "model.layer_types=[csa, hca]", "model.hidden_size=32",
         "model.n_routed_experts=4", "data.seq_len=48", "data.batch_size=8", "train.log_every=1",
         "train.eval_every=0", "--no-progress"]


def losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    assert train.main(["--workdir", str(straight), "train.steps=6", "train.checkpoint_every=3", *SMALL]) == 0
    split = tmp_path / "split"
    assert train.main(["--workdir", str(split), "--stop-after-step", "3", "train.steps=6", "train.checkpoint_every=3",
                       *SMALL]) == 0
    assert losses(split).keys() == {1, 2, 3}
    assert train.main(["--workdir", str(split), "train.steps=6", "train.checkpoint_every=3", *SMALL]) == 0
    a, b = losses(straight), losses(split)
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):  # same program, same data, same state: the same numbers
        assert a[step] == b[step], (step, a[step], b[step])
    assert a[6] < a[1]

    out = tmp_path / "eval.json"
    assert eval_script.main(["--workdir", str(straight), "--batches", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["step"] == 6 and result["main"]["perplexity"] == pytest.approx(np.exp(result["main"]["loss"]))
    assert "mtp" in result and result["main"]["tokens"] > 0

    # the run trained on the scan layout; resuming it on the per-layer layout is refused up front
    assert train.main(["--workdir", str(straight), "train.steps=7", "parallel.scan_layers=false", *SMALL]) == 2


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
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= 2, err


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "stepz"),
    ("train.lr=-1", "train.lr"),
    ("data.tokenizer=chars", "data.tokenizer"),
    ("model.o_groups=3", "o_groups"),
    ("nonsense", "section.key=value"),
])
def test_bad_config_is_refused_and_nothing_written(tmp_path, capsys, override, message):
    workdir = tmp_path / "w"
    assert train.main(["--workdir", str(workdir), override, *SMALL]) == 2
    assert message in capsys.readouterr().err
    assert not workdir.exists()


def test_non_finite_step_is_skipped():
    run = load_run_config(ROOT / "configs/tiny.yaml", [o for o in SMALL if not o.startswith("--")])
    from v4jax.model import init_params

    optimizer = make_optimizer(run.train, run.model)
    params = init_params(run.model, 0)
    params["norm"] = params["norm"].at[0].set(jnp.nan)
    state = init_state(params, optimizer)
    before = jax.tree.map(np.asarray, state["params"])
    step = make_train_step(run.model, run.train, optimizer)
    b, s = 8, 48
    batch = {"tokens": jnp.ones((b, s), jnp.int32), "positions": jnp.broadcast_to(jnp.arange(s), (b, s)),
             "segment_ids": jnp.ones((b, s), jnp.int32), "targets": jnp.ones((b, s), jnp.int32),
             "loss_mask": jnp.ones((b, s)), "mtp_targets": jnp.ones((b, s), jnp.int32), "mtp_mask": jnp.ones((b, s))}
    state, metrics = step(state, batch)
    assert not bool(metrics["ok"])
    jax.tree.map(lambda a, c: np.testing.assert_array_equal(np.asarray(a), c), state["params"], before)
