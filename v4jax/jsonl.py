"""Reading .jsonl files (a corpus, SFT conversations, prompts): one JSON value per line, blank lines
skipped, and a line that does not parse reported as ``path:line: not JSON (why)``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def json_lines(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[str, Any]]:
    """(``"path:line"``, the line's value) for each non-blank line of ``path``; a line that is not
    JSON raises ``error`` naming the file and the line (the caller's error type: a corpus's
    ``DataError``, a config's ``ConfigError``)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: not JSON ({e.msg})") from None
            yield where, value
