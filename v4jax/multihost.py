"""What the processes of a multi-host job agree on: who writes, process 0's word, everyone's flag.

A pod runs one JAX process per host, all running the same program. Files that belong to the run
(logs, config, lock, a saved model's config) are written by process 0 alone (``is_writer``);
decisions that only process 0 can make (is the workdir free, is the output path taken) reach the
others through ``from_process_0``, and a check every process makes for itself becomes the job's
through ``on_every_process``, so all processes take the same branch and none waits forever in a
collective the others skipped. In a single-process job each function is the identity.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

MESSAGE_BYTES = 4096


def single_process() -> bool:
    """No multi-process job: answered without starting JAX's backends where jax.distributed is not
    initialised (every multi-host job initialises it), as the converter's writes need no devices."""
    return not jax.distributed.is_initialized() or jax.process_count() == 1


def is_writer() -> bool:
    """This process writes the run's own files (process 0)."""
    return single_process() or jax.process_index() == 0


def from_process_0(message: str) -> str:
    """Process 0's ``message`` on every process (at most MESSAGE_BYTES of UTF-8; the others pass anything)."""
    if single_process():
        return message
    from jax.experimental import multihost_utils  # noqa: PLC0415

    buf = np.zeros(MESSAGE_BYTES, np.uint8)
    raw = message.encode()[:MESSAGE_BYTES]
    buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(buf).rstrip(b"\0").decode(errors="replace")


def on_every_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on every process, else False on every process."""
    if single_process():
        return flag
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return bool(np.all(multihost_utils.process_allgather(np.array(flag))))


def largest(value: int) -> int:
    """The largest of the processes' ``value``s, on every process."""
    if single_process():
        return value
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return int(np.max(multihost_utils.process_allgather(np.array(value, np.int32))))


def barrier(name: str) -> None:
    """Wait until every process has reached the barrier of this ``name``."""
    if not single_process():
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)


def on_process_0(fn: Callable[[], str]) -> str:
    """``fn()`` run by process 0 alone, its result (a str) on every process. If it raises, process 0
    raises its exception and every other process an OSError with the same message: no process is
    left waiting for the others."""
    result, error = "", None
    if is_writer():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 -- re-raised below, after the others are told
            error, result = e, str(e)
    word = from_process_0(("error:" if error is not None else "ok:") + result)
    if error is not None:
        raise error
    if word.startswith("error:"):
        raise OSError(f"process 0: {word[len('error:'):]}")
    return word[len("ok:"):]
