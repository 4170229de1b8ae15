"""Draw a train.py run's curves from its metrics.jsonl to a PNG (``python -m v4jax.cli.plot``).

    python -m v4jax.cli.plot --workdir runs/tiny [--out FILE]

One figure, three panels, against the training step:

* loss: the main head's training loss ``lm_loss``, the MTP head's ``mtp_loss`` (token t + 2), and
  the held-out losses ``eval_main_loss`` and ``eval_mtp_loss`` where the run evaluated
  (``train.eval_every``); the weighted total ``loss`` is left out, as its MTP weight changes at
  ``train.decay_start``;
* learning rate ``lr``;
* expert load balance ``max_load_over_mean``: the busiest expert's share of the routed tokens over
  the mean share, averaged over the MoE layers (1 is a perfect balance);
* and for a post-training run (README "Post-training") a fourth, the policy: the mean reward of each
  step's samples ``reward_mean`` and of the greedy held-out answers ``eval_reward``, the share of
  completion tokens whose most likely token is the teachers' ``agreement`` and of held-out answers
  equal to the teacher's ``eval_agreement``; its KL to the reference (``kl``) or the teachers
  (``reverse_kl``) goes in the loss panel.

Written to ``--out`` (default ``WORKDIR/curves.png``) under a temporary name and renamed when
complete. A missing, empty or garbled metrics file is one ``error:`` line and exit status 2; a
last line cut short (a run killed while it wrote) is left out with a warning.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

PANELS = (  # (title, y label, [(metrics key, legend label)])
    ("loss", "nats per token", [("lm_loss", "main head (train)"), ("mtp_loss", "MTP head (train)"),
                                ("eval_main_loss", "main head (held-out)"),
                                ("eval_mtp_loss", "MTP head (held-out)"), ("kl", "KL to the reference (k3)"),
                                ("reverse_kl", "reverse KL to the teachers")]),
    ("learning rate", "lr", [("lr", "lr")]),
    ("expert load balance", "max load / mean load", [("max_load_over_mean", "max / mean over experts")]),
)
POLICY = ("policy", "mean reward / share", [("reward_mean", "reward (samples)"),
                                            ("eval_reward", "reward (held-out, greedy)"),
                                            ("agreement", "token agreement with the teachers"),
                                            ("eval_agreement", "held-out answers as the teacher's")])


def panels(rows: list[dict]) -> tuple:
    """PANELS, and the policy panel for a run that logged any of its metrics."""
    return PANELS + ((POLICY,) if any(series(rows, key)[0] for key, _ in POLICY[2]) else ())


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="v4jax-plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a train.py workdir (with metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG file to write (default: WORKDIR/curves.png)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out, _ = plot(args.workdir, args.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def read_metrics(path: Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl, in file order. ValueError names the file (and line) of
    a missing, empty or garbled file; a last line without its newline that does not parse is a
    write cut short and is left out with a warning."""
    if not path.is_file():
        raise ValueError(f"no metrics file {path}: pass the --workdir of a train.py run that has logged a step")
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: the run was killed while writing it
                print(f"warning: {path}:{number}: a line cut short; left out", file=sys.stderr)
                continue
            raise ValueError(f"{path}:{number}: not a JSON line ({e.msg}); metrics.jsonl holds one JSON object "
                             "per line, as train.py writes it") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{number}: not a metrics line (a JSON object with an integer 'step')")  # noqa: TRY004
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} is empty: the run has not logged a step yet (it logs every train.log_every steps)")
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, by step; a step logged twice (a run resumed before its log was
    trimmed) keeps its last value, and values that are not finite numbers are left out."""
    by_step = {}
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            by_step[row["step"]] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def figure(rows: list[dict], title: str):
    """A matplotlib Figure (no pyplot state) with the run's ``panels``; each line's label is its
    legend label and its ``gid`` the metrics key it draws."""
    from matplotlib.figure import Figure

    shown = panels(rows)
    fig = Figure(figsize=(5 * len(shown), 4), layout="constrained")
    fig.suptitle(title)
    for ax, (name, ylabel, keys) in zip(fig.subplots(1, len(shown)), shown, strict=True):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        drawn = 0
        for key, label in keys:
            steps, values = series(rows, key)
            if steps:  # held-out points are few and far between: dashed, with markers
                held_out = key.startswith("eval_")
                ax.plot(steps, values, linestyle="--" if held_out else "-",
                        marker="o" if held_out else "." if len(steps) < 30 else None, label=label, gid=key)
                drawn += 1
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="gray")
    return fig


def plot(workdir, out=None):
    """Read ``WORKDIR/metrics.jsonl``, draw it, write the PNG. Returns (the PNG's path, the Figure)."""
    workdir = Path(workdir)
    rows = read_metrics(workdir / "metrics.jsonl")
    if not any(series(rows, key)[0] for _, _, keys in PANELS + (POLICY,) for key, _ in keys):
        raise ValueError(f"{workdir / 'metrics.jsonl'} holds none of the metrics plotted "
                         f"({', '.join(key for _, _, keys in PANELS for key, _ in keys)})")
    fig = figure(rows, f"{workdir.resolve().name}: step {max(r['step'] for r in rows)}")
    out = Path(out) if out else workdir / "curves.png"
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, fig


if __name__ == "__main__":
    sys.exit(main())
