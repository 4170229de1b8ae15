"""A train.py run's directory: one run at a time (its lock), and its files replaced atomically.

``workdir_lock(workdir)`` holds ``WORKDIR/train.lock`` for a run; ``trim_metrics`` keeps
``metrics.jsonl`` consistent with the step a resumed run goes on from; ``write_atomically`` writes
a whole file or nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path

from v4jax.multihost import from_process_0, is_writer

LOCK = "train.lock"


class LockError(Exception):
    """The workdir cannot be locked: another run holds it, its lock cannot be checked, or it cannot be written."""


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    """Hold ``WORKDIR/train.lock`` for the block, or raise LockError naming the owner.

    The lock belongs to the run, not to a process: in a multi-host run process 0 takes it and every
    process gets its outcome, so all of a refused run's processes stop with the same message. The
    lock is a ``flock`` on the file, which the kernel drops when its process dies, so a killed run
    cannot hold a workdir forever; the file's JSON (host, pid, start time) names the owner. A lock
    file left on this host without its ``flock`` is stale and taken over with a warning (on a
    filesystem without ``flock``, only if its pid is gone); one from another host is refused, as
    this host cannot see whether that run still holds it. Released (the file removed, and a workdir
    this lock created removed again if still empty) when the block ends, however it ends.
    """
    fd, problem, created = None, "", False
    if is_writer():
        try:
            created = not workdir.exists()
            workdir.mkdir(parents=True, exist_ok=True)
            fd = _take_lock(workdir)
        except (LockError, OSError) as e:
            problem = str(e)
    problem = from_process_0(problem)
    if problem:
        raise LockError(problem)
    try:
        yield
    finally:
        if fd is not None:
            _release_lock(workdir, fd, created)


def _take_lock(workdir: Path) -> int:
    """The lock file's descriptor, holding its flock, with this process named in it."""
    path = workdir / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise LockError(f"workdir {workdir} is in use by another train.py run ({_describe(owner)}): "
                            "wait for it to end or use another --workdir") from None
        except OSError:
            flocked = False  # a filesystem without flock: the owner's pid is all there is to check
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        os.close(fd)  # the owner removed the file between our open and flock: open the new one
    owner = _read_owner(fd)
    problem = None
    if owner is None:
        problem = "locked by a lock file that does not parse"
    elif owner and owner["host"] != socket.gethostname():
        problem = f"locked by {_describe(owner)}, which host {socket.gethostname()} cannot check"
    elif owner and not flocked and owner["pid"] != os.getpid() and _alive(owner["pid"]):
        problem = f"in use by another train.py run ({_describe(owner)})"
    if problem:
        os.close(fd)
        raise LockError(f"workdir {workdir} is {problem}: if no run uses it, delete {path}; "
                        "else wait for that run to end or use another --workdir")
    if owner:
        warnings.warn(f"workdir {workdir}: taking over the stale lock of {_describe(owner)}, a run that ended "
                      "without releasing it", stacklevel=2)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    return fd


def _read_owner(fd: int) -> dict | None:
    """The lock file's owner: {} if the file is empty (new), None if it does not parse."""
    text = os.pread(fd, 4096, 0).decode(errors="replace")
    if not text:
        return {}
    try:
        owner = json.loads(text)
        return owner if isinstance(owner.get("pid"), int) and isinstance(owner.get("host"), str) else None
    except (ValueError, AttributeError):
        return None


def _describe(owner: dict | None) -> str:
    if not owner:
        return "its owner is not written yet"
    return f"pid {owner['pid']} on host {owner['host']}, started {owner.get('started', '?')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _release_lock(workdir: Path, fd: int, created: bool) -> None:
    path = workdir / LOCK
    with contextlib.suppress(FileNotFoundError):
        if os.stat(path).st_ino == os.fstat(fd).st_ino:  # never remove a file someone else created since
            os.unlink(path)
    os.close(fd)  # after the unlink: a run waiting on this file finds it gone and opens a new one
    if created:
        with contextlib.suppress(OSError):
            workdir.rmdir()  # only if empty: a run that stopped before writing leaves no trace


def trim_metrics(path: Path, step: int) -> None:
    """Keep the lines of ``metrics.jsonl`` up to ``step`` (the state the run goes on from), in order;
    later or torn lines are dropped. The file is replaced atomically, so a kill leaves the old or
    the new log, never a mix."""
    if not path.exists():
        return
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            keep = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            keep = False  # a torn line from a killed write
        kept += [line] if keep else []
        dropped += not keep
    if dropped:
        write_atomically(path, "".join(line + "\n" for line in kept))
        warnings.warn(f"{path}: dropped {dropped} line(s) of steps after step {step}, the state this run goes on "
                      "from", stacklevel=2)


def write_atomically(path: Path, text: str) -> None:
    """Write a temporary file beside ``path`` and rename it onto ``path``: all of it or nothing."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None


def find_run(path: str | Path) -> tuple[Path, int | None] | None:
    """(run directory, step or None) when ``path`` is a train.py run (it holds ``checkpoints/``)
    or one of its steps (``RUN/checkpoints/N``), else None: what lets every tool that takes a
    checkpoint take a run too."""
    path = Path(path)
    if path.parent.name == "checkpoints" and path.name.isdigit():
        return path.parent.parent, int(path.name)
    if (path / "checkpoints").is_dir():
        return path, None
    return None
