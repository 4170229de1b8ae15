"""train.py against faults and bad input: a workdir used by two runs, a step that turns the state
non-finite, a log written past the last checkpoint, broken checkpoints, OS errors."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train
from tests.helpers import launch
from tests.test_train import ROOT, SMALL
from v4jax.checkpoint import Checkpointer, CheckpointError, abstract
from v4jax.config import ConfigError
from v4jax.workdir import LockError, trim_metrics, workdir_lock

# A process that holds a workdir's lock until it is killed.
HOLD = """import sys, time
from pathlib import Path
from v4jax.workdir import workdir_lock
with workdir_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def hold_lock(workdir: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert child.stdout.readline() == "locked\n"
    return child


def test_a_second_run_is_refused_and_a_dead_runs_lock_taken_over(tmp_path, capsys):
    workdir = tmp_path / "w"
    child = hold_lock(workdir)
    try:
        assert train.main(["--workdir", str(workdir), *SMALL]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: workdir {workdir} is in use"), err
        assert f"pid {child.pid} on host {socket.gethostname()}" in err
        assert [p.name for p in workdir.iterdir()] == ["train.lock"]  # the refused run wrote nothing
    finally:
        child.kill()
        child.wait()
    # the killed run's file is left, without its flock: stale, taken over with a warning
    with pytest.warns(UserWarning, match=f"taking over the stale lock of pid {child.pid} "):
        with workdir_lock(workdir):
            assert json.loads((workdir / "train.lock").read_text())["pid"] == os.getpid()
    assert list(workdir.iterdir()) == []  # released


def test_locks_that_cannot_be_checked_are_refused(tmp_path, monkeypatch):
    lock = tmp_path / "train.lock"
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "2026-01-01 00:00:00 UTC"}))
    with pytest.raises(LockError, match=f"locked by pid 1 on host elsewhere.*delete {lock}"):
        with workdir_lock(tmp_path):
            pass
    lock.write_text("{not json")
    with pytest.raises(LockError, match=f"does not parse: if no run uses it, delete {lock}"):
        with workdir_lock(tmp_path):
            pass
    # a filesystem without flock: the pid is all there is, and a live one holds the workdir
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr("fcntl.flock", no_flock)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))
    with pytest.raises(LockError, match=f"in use by another train.py run \\(pid {os.getppid()} "):
        with workdir_lock(tmp_path):
            pass
    assert lock.exists()  # a refused lock is left alone


TWO_PROCESSES = """import sys
from pathlib import Path
from v4jax.parallel import initialize_distributed
initialize_distributed()
import jax
from jax.experimental.multihost_utils import sync_global_devices
from v4jax.workdir import LockError, workdir_lock
try:
    with workdir_lock(Path(sys.argv[1])):
        sync_global_devices("both hold it")  # then look, before either lets go
        held = Path(sys.argv[1], "train.lock").exists()
        sync_global_devices("both looked")
        result = f"held {jax.process_index()} {held}"
except LockError as e:
    result = f"refused {jax.process_index()} {e}"
Path(sys.argv[2], f"process{jax.process_index()}").write_text(result)  # not stdout: gloo's lines land in it
"""


def run_two_processes(workdir: Path) -> list[str]:
    """Both processes of a 2-process jax.distributed job take the workdir lock; their outputs."""
    results = workdir.parent / "results"
    results.mkdir(exist_ok=True)
    launch(["-c", TWO_PROCESSES, str(workdir), str(results)], timeout=120, devices_each=2)
    return [(results / f"process{i}").read_text() for i in range(2)]


def test_the_processes_of_a_multi_host_run_share_one_lock(tmp_path):
    workdir = tmp_path / "w"
    child = hold_lock(workdir)
    try:
        refused = run_two_processes(workdir)
    finally:
        child.kill()
        child.wait()
    for i, out in enumerate(refused):  # process 0 found the lock held; process 1 stops with its message
        assert out.startswith(f"refused {i} workdir {workdir} is in use") and f"pid {child.pid} " in out, out
    (workdir / "train.lock").unlink()
    assert run_two_processes(workdir) == ["held 0 True", "held 1 True"]
    assert list(workdir.iterdir()) == []  # released by process 0


def test_metrics_keep_the_steps_of_the_restored_state(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    log.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # killed in the middle of a line
    with pytest.warns(UserWarning, match="dropped 3 line\\(s\\) of steps after step 2"):
        trim_metrics(log, 2)
    assert log.read_text() == lines[0] + "\n" + lines[1] + "\n"
    with pytest.warns(UserWarning, match="dropped 2 line"):
        trim_metrics(log, 0)  # a run with no checkpoint starts afresh
    assert log.read_text() == "" and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_os_errors_are_one_line_and_leave_nothing(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert train.main(["--workdir", str(tmp_path / "file" / "w"), *SMALL]) == 2
    assert capsys.readouterr().err == f"error: [Errno 20] Not a directory: '{tmp_path / 'file' / 'w'}'\n"

    # as on a full disk, writing the config fails (writes past 1 KB: EFBIG rather than ENOSPC)
    small_files_only = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                        "resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)); sys.argv = sys.argv[1:]; "
                        "runpy.run_path('train.py', run_name='__main__')")
    workdir = tmp_path / "w"
    proc = subprocess.run([sys.executable, "-c", small_files_only, "train.py", "--workdir", str(workdir), *SMALL],
                          cwd=ROOT, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.endswith(
        f"error: [Errno 27] File too large: '{workdir / 'config.json'}'\n"), proc.stderr
    assert "Traceback" not in proc.stderr and not workdir.exists()  # lock released, the new workdir removed


# --------------------------------------------------------------------------------------------------
# Broken checkpoints


def state(step: int, b: float = 1.0) -> dict:
    return {"params": {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.full(5, b)}, "step": jnp.array(step)}


def chunks(step_dir: Path) -> list[Path]:
    return [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]


BREAK = {
    "deleted chunk": lambda d: [p.unlink() for p in chunks(d)],
    "truncated chunk": lambda d: [p.write_bytes(p.read_bytes()[:20]) for p in chunks(d)],
    "garbled _METADATA": lambda d: (d / "state" / "_METADATA").write_text("{garbled"),
    "garbled meta item": lambda d: (d / "meta" / "metadata").write_text("{garbled"),
    "garbled data item": lambda d: (d / "data" / "process_0-of-1.json").write_text("{garbled"),
    "no state item": lambda d: shutil.rmtree(d / "state"),
    "inf value": lambda d: save_with_inf(d),
}


def save_with_inf(step_dir: Path) -> None:
    """The step again, as if a flipped bit had made a value inf (written past Checkpointer.save, which refuses it)."""
    shutil.rmtree(step_dir)
    ckpt = Checkpointer(step_dir.parent, keep=5, async_save=False)
    step = int(step_dir.name)
    ckpt.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state(step, np.inf)),
                                                    data=ocp.args.JsonSave({}), meta=ocp.args.JsonSave({})))
    ckpt.close()


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ck") / "checkpoints"
    ckpt = Checkpointer(directory, keep=5, async_save=False)
    for step in (1, 2):
        ckpt.save(step, state(step), {"batch": step}, {"step": step})
    ckpt.close()
    return directory


def test_a_non_finite_state_is_not_saved(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    with pytest.raises(ValueError, match="step 3: the train state holds inf or nan; it is not saved"):
        ckpt.save(3, state(3, np.nan), {}, {})
    ckpt.close()
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("how", BREAK)
def test_a_broken_newest_step_is_skipped_with_a_warning(two_steps, tmp_path, how):
    directory = tmp_path / "checkpoints"
    shutil.copytree(two_steps, directory)
    BREAK[how](directory / "2")
    ckpt = Checkpointer(directory, keep=5, async_save=False)
    with pytest.warns(UserWarning, match=f"checkpoint {directory / '2'} (cannot be read|holds inf).*skipped"):
        restored, data_state, meta = ckpt.restore(abstract(state(0)))
    assert int(restored["step"]) == 1 and data_state == {"batch": 1} and meta == {"step": 1}
    with pytest.raises(CheckpointError, match=f"^checkpoint {directory / '2'} (cannot be read|holds inf)"):
        ckpt.restore(abstract(state(0)), step=2)
    # train.py sets the broken step aside, so that a resumed run can save step 2 again
    with pytest.warns(UserWarning, match=f"renamed the broken checkpoint {directory / '2'} to 2.broken"):
        ckpt.set_aside_skipped()
    assert ckpt.save(2, state(2), {}, {})
    ckpt.close()
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2", "2.broken"]


def test_data_states_are_per_process(two_steps, tmp_path):
    """Each process's data state is its own file; a step saved by 2 processes is refused by a run of
    one (the data is split by process); a step from before per-process states (one ``metadata``
    file, process 0's) restores in a single-process run."""
    directory = tmp_path / "checkpoints"
    shutil.copytree(two_steps, directory)
    data = directory / "2" / "data"
    assert sorted(p.name for p in data.iterdir() if p.suffix == ".json") == ["process_0-of-1.json"]
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    (data / "process_1-of-2.json").write_text("{}")
    ckpt = Checkpointer(directory, keep=5, async_save=False)
    with pytest.raises(ConfigError, match="saved by a run of 2 process\\(es\\) and this one has 1: .* resume with 2"):
        ckpt.restore(abstract(state(0)))
    assert int(ckpt.restore(abstract(state(0)), data=False)[0]["step"]) == 2  # inference needs no data state
    for p in data.glob("process_*"):
        p.unlink()
    (data / "metadata").write_text(json.dumps({"batch": 2}))
    restored, data_state, _ = ckpt.restore(abstract(state(0)))
    assert int(restored["step"]) == 2 and data_state == {"batch": 2}
    ckpt.close()


def test_no_step_restores(two_steps, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(two_steps, directory)
    for step in ("1", "2"):
        BREAK["garbled meta item"](directory / step)
    ckpt = Checkpointer(directory, keep=5, async_save=False)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=f"no checkpoint in {directory} can be"):
        ckpt.restore(abstract(state(0)))
    ckpt.close()


@pytest.mark.parametrize("args, name", [(["--workdir", "gs://bucket/run"], "--workdir"),
                                        (["data.path=s3://bucket/corpus"], "data.path")])
def test_urls_are_refused_before_anything_is_written(tmp_path, monkeypatch, capsys, args, name):
    monkeypatch.chdir(tmp_path)  # a URL taken as a path would make ./gs: here
    assert train.main(["--config", str(ROOT / "configs/tiny.yaml"), *args, *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {name}=") and "is a URL" in err and "mount the bucket" in err, err
    assert list(tmp_path.iterdir()) == []
