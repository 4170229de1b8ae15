"""A multi-host job, for real: 2 JAX processes of 4 CPU devices each (jax.distributed, gloo).

One training run over a mesh spanning both processes (fsdp 2 x expert 4, Muon spread over the mesh,
2 micro-batches per update) is stopped at step 3 and resumed to step 6. Against an in-process run
of the same program on this process's 8 devices, fed the same global batches (each process's rows,
process 0's first), it must give the same losses at every step and the same final parameters:
the resumed run equals the uninterrupted one. Then the run is loaded with ``from_pretrained`` on
the two processes, its logits taken plainly and under ``jax.jit``, saved with ``Model.save`` (a
collective save) and loaded again, against the single-process model.

Every launch has a hard timeout that kills both processes (and their children): a process that
dies leaves the other waiting in a collective for minutes. No persistent compilation cache: only
process 0 would write it, and the processes would drift apart past gloo's 30 s deadline.
"""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.helpers import launch, rel

ROOT = Path(__file__).resolve().parents[1]
PROCESSES, DEVICES_EACH = 2, 4
OVERRIDES = ["model.num_hidden_layers=2", "model.layer_types=[csa, hca]", "model.hidden_size=32",
             "model.n_routed_experts=4", "data.seq_len=32", "data.batch_size=16", "train.grad_accum_steps=2",
             "train.steps=6", "train.checkpoint_every=3", "train.eval_every=0", "train.log_every=1",
             "parallel.data=1", "parallel.fsdp=2", "parallel.expert=4"]
LOSS_RTOL = 1e-5  # the issue's bound; the same program, only the collectives' transport differs
LOGITS_TOL = 1e-5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 6-step run of train.py on 2 processes: stopped after step 3, then resumed. The stop is asked
    of process 0 alone, as a preemption notice may reach only some hosts: both must save and stop."""
    workdir = tmp_path_factory.mktemp("multihost") / "run"
    train = ["train.py", "--config", "configs/tiny.yaml", "--workdir", str(workdir), "--no-progress", *OVERRIDES]
    outs = launch(train, timeout=600, process_0=("--stop-after-step", "3"), processes=PROCESSES,
                  devices_each=DEVICES_EACH)
    assert "--stop-after-step on another process: saving step 3" in outs[1], outs[1][-2000:]
    step3 = workdir / "checkpoints" / "3"
    files = {p.name for p in (step3 / "data").iterdir()}
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= files, files  # each process's own data position
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= {p.name for p in (step3 / "state").iterdir()}
    states = [json.loads((step3 / "data" / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert [s["settings"]["process_index"] for s in states] == [0, 1]
    outs = launch(train, timeout=600, processes=PROCESSES, devices_each=DEVICES_EACH)
    assert all("resumed from step 3" in out for out in outs), outs[0][-2000:]
    return workdir


def reference_run():
    """The same run in this process, on its 8 devices, fed the same global batches: its losses per
    step, and a function giving the loss that a train state takes on the batch after the last step."""
    from v4jax.cli.train import fresh_state
    from v4jax.data import make_dataset, resolve_heldout_fraction
    from v4jax.engram import hasher_for
    from v4jax.parallel import batch_sharding, make_mesh
    from v4jax.trainer import load_run_config, make_optimizer, make_train_step

    run = load_run_config(ROOT / "configs/tiny.yaml", OVERRIDES)
    run = dataclasses.replace(run, data=resolve_heldout_fraction(run.data))
    mesh = make_mesh(run.parallel)
    state = fresh_state(run, mesh)
    step = make_train_step(run.model, run.train, make_optimizer(run.train, run.model, mesh), run.parallel, mesh)
    hosts = [make_dataset(run.data, i, PROCESSES, hasher_for(run.model)) for i in range(PROCESSES)]
    batches = []
    for _ in range(run.train.steps + 1):
        parts = [next(h) for h in hosts]  # each process's rows, as make_array_from_process_local_data places them
        batches.append(jax.device_put({k: np.concatenate([p[k] for p in parts]) for k in parts[0]},
                                      batch_sharding(mesh)))
    losses = []
    for batch in batches[:-1]:
        state, metrics = step(state, batch)
        losses.append({k: float(metrics[k]) for k in ("loss", "lm_loss")})
    return losses, state, lambda s: float(step(s, batches[-1])[1]["loss"]), mesh


def test_training_on_two_processes_resumes_and_matches_one_process(run_dir):
    from v4jax.trainer import restore_run

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]  # one writer, and the resumed run logs on from 4
    assert json.loads((run_dir / "config.json").read_text())["train"]["grad_accum_steps"] == 2
    want, state, next_loss, mesh = reference_run()
    for got, ref in zip(lines, want):  # steps 4-6: the resumed run against the uninterrupted one
        for key in ("loss", "lm_loss"):
            assert got[key] == pytest.approx(ref[key], rel=LOSS_RTOL), (got["step"], key)
    # The last update and the last save, checked the same way: the loss of the saved state (read here,
    # from the files both processes wrote) on the next batch. Parameters are not compared one by one:
    # Muon's orthogonalisation and AdamW's eps of 1e-20 turn rounding-level gradient differences into
    # update-sized ones (mHC's base, trained by AdamW from near-zero gradients, differs by its own
    # size here, and as much between in-process runs on two meshes), while the losses stay within 1e-5.
    saved = restore_run(run_dir, mesh=mesh)["state"]
    assert int(saved["step"]) == 6
    assert next_loss(saved) == pytest.approx(next_loss(state), rel=LOSS_RTOL)


MODEL_ON_TWO_PROCESSES = """import sys
from pathlib import Path
from v4jax.parallel import initialize_distributed
initialize_distributed()
import jax, numpy as np
from jax.experimental.multihost_utils import process_allgather
import v4jax
run, out = Path(sys.argv[1]), Path(sys.argv[2])
mesh = jax.make_mesh((2, 4), ("fsdp", "expert"))  # over both processes' devices
tokens = np.load(out / "tokens.npy")
model = v4jax.from_pretrained(run, mesh=mesh)
plain = process_allgather(model.logits(tokens), tiled=True)
jitted = process_allgather(jax.jit(v4jax.Model.logits)(model, tokens), tiled=True)
model.save(out / "saved")
again = process_allgather(v4jax.from_pretrained(out / "saved", dtype="float32", mesh=mesh).logits(tokens), tiled=True)
kept = v4jax.from_pretrained(out / "kept", dtype="float32", quantized=True, mesh=mesh)  # FP8/FP4 as stored
kept_logits = process_allgather(jax.jit(v4jax.Model.logits)(kept, tokens), tiled=True)
kept.save(out / "kept_saved")
if jax.process_index() == 0:
    np.savez(out / "logits.npz", plain=plain, jitted=jitted, again=again, kept=kept_logits)
"""


def test_from_pretrained_jit_and_save_on_two_processes(run_dir, tmp_path):
    """Also with the weights kept FP8/FP4 (the run's weights encoded by ``schema.as_stored`` and saved
    in one process): loaded on the two processes their logits equal one process's, and their
    collective save writes the same codes and scales."""
    import v4jax
    from v4jax.quant import is_block_scaled
    from v4jax.schema import as_stored

    tokens = np.random.default_rng(0).integers(0, 256, (2, 32)).astype(np.int32)
    np.save(tmp_path / "tokens.npy", tokens)
    dense = v4jax.from_pretrained(run_dir, dtype="float32")
    kept = dataclasses.replace(dense, params=as_stored(dense.params, dense.config))
    kept.save(tmp_path / "kept")
    launch(["-c", MODEL_ON_TWO_PROCESSES, str(run_dir), str(tmp_path)], timeout=420, processes=PROCESSES,
           devices_each=DEVICES_EACH)
    got = np.load(tmp_path / "logits.npz")
    want = v4jax.from_pretrained(run_dir).logits(tokens)  # one process, one device
    for key in ("plain", "jitted", "again"):
        assert rel(got[key], want) <= LOGITS_TOL, key
    saved = tmp_path / "saved"
    assert {p.name for p in saved.iterdir()} == {"config.json", "v4jax_checkpoint.json", "params"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".saved")]  # no temporary left behind
    assert rel(v4jax.from_pretrained(saved, dtype="float32").logits(tokens), want) <= LOGITS_TOL

    assert rel(got["kept"], kept.logits(tokens)) <= LOGITS_TOL
    flat = lambda m: dict(jax.tree_util.tree_flatten_with_path(m.params)[0])  # noqa: E731
    a, b = (flat(v4jax.from_pretrained(tmp_path / d, dtype="float32", quantized=True)) for d in ("kept", "kept_saved"))
    assert a.keys() == b.keys() and any(str(p[-1]) == ".codes" for p in a)  # BlockScaled leaves saved as such
    for p in a:
        assert a[p].dtype == b[p].dtype, p
        np.testing.assert_array_equal(np.asarray(a[p]).view(np.uint8), np.asarray(b[p]).view(np.uint8), err_msg=str(p))
    assert any(is_block_scaled(w) for w in jax.tree.leaves(kept.params, is_leaf=is_block_scaled))


POST = ["model.num_hidden_layers=2", "model.layer_types=[swa, csa]", "model.hidden_size=32",
        "model.n_routed_experts=4", "model.num_hash_layers=0", "post.prompts_per_step=2", "post.samples_per_prompt=4",
        "data.batch_size=8", "post.max_new_tokens=4", "post.eval_prompts=4", "post.sft_steps=2", "train.steps=4",
        "train.log_every=1", "train.checkpoint_every=2", "train.eval_every=2", "parallel.data=1", "parallel.fsdp=2",
        "parallel.expert=4"]


def test_grpo_on_two_processes_resumes_and_matches_one_process(tmp_path):
    """tiny-grpo.yaml, made smaller, on 2 processes (fsdp 2 x expert 4): 2 supervised steps, then GRPO
    with the rollouts sampled on the mesh over both processes and the reference saved collectively;
    stopped at step 3 and resumed. Against train.py in this process on its 8 devices: the same
    losses, rewards and held-out rewards at every step."""
    import train

    args = ["--config", "configs/tiny-grpo.yaml", "--no-progress", *POST]
    workdir = tmp_path / "two"
    launch(["train.py", "--workdir", str(workdir), *args], timeout=600, process_0=("--stop-after-step", "3"),
           processes=PROCESSES, devices_each=DEVICES_EACH)
    outs = launch(["train.py", "--workdir", str(workdir), *args], timeout=600, processes=PROCESSES,
                  devices_each=DEVICES_EACH)
    assert all("resumed from step 3" in out for out in outs), outs[0][-2000:]
    assert train.main(["--workdir", str(tmp_path / "one"), *args]) == 0
    got, want = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
                 for d in (workdir, tmp_path / "one"))
    assert [m["step"] for m in got] == [m["step"] for m in want] == [1, 2, 3, 4]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), a["step"]
        for key in ("reward_mean", "completion_tokens", "eval_reward"):
            assert a.get(key) == b.get(key), (a["step"], key)
    assert "reward_mean" in got[2] and "eval_reward" in got[3]
