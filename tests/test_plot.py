"""v4jax.cli.plot: a run's curves from a hand-written metrics.jsonl, and bad input as one error line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from v4jax.cli import plot

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(workdir: Path, rows, tail: str = "") -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def lines_by_key(fig) -> dict:
    """{metrics key: (steps, values)} of every line drawn, by panel title."""
    return {ax.get_title(): {line.get_gid(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
            for ax in fig.axes}


def test_curves_of_a_run(tmp_path, capsys):
    rows = [{"step": s, "loss": 9.0, "lm_loss": 5.0 - s / 2, "mtp_loss": 5.5 - s / 2, "lr": s * 1e-3,
             "max_load_over_mean": 1.0 + 1 / s, "tokens_per_s": 100.0} for s in (1, 2, 3, 4)]
    rows[1]["eval_main_loss"], rows[1]["eval_mtp_loss"] = 4.9, 5.3
    rows[3]["eval_main_loss"], rows[3]["eval_mtp_loss"] = 4.1, 4.6
    rows[2]["lm_loss"] = float("nan")  # a skipped step: not drawn
    # a run killed while writing its last line: left out, with a warning
    write_metrics(tmp_path / "run", rows, tail='{"step": 5, "lm_lo')

    out, fig = plot.plot(tmp_path / "run")
    assert out == tmp_path / "run" / "curves.png" and out.read_bytes().startswith(PNG_MAGIC)
    assert "a line cut short; left out" in capsys.readouterr().err
    assert lines_by_key(fig) == {
        "loss": {"lm_loss": ([1, 2, 4], [4.5, 4.0, 3.0]), "mtp_loss": ([1, 2, 3, 4], [5.0, 4.5, 4.0, 3.5]),
                 "eval_main_loss": ([2, 4], [4.9, 4.1]), "eval_mtp_loss": ([2, 4], [5.3, 4.6])},
        "learning rate": {"lr": ([1, 2, 3, 4], [0.001, 0.002, 0.003, 0.004])},
        "expert load balance": {"max_load_over_mean": ([1, 2, 3, 4], [2.0, 1.5, 1.0 + 1 / 3, 1.25])},
    }

    # a run without MTP or evaluation, resumed once (step 2 logged twice: the last value counts)
    rows = [{"step": 1, "lm_loss": 3.0, "lr": 0.1}, {"step": 2, "lm_loss": 9.0, "lr": 0.2},
            {"step": 2, "lm_loss": 2.0, "lr": 0.2}]
    write_metrics(tmp_path / "plain", rows)
    assert plot.main(["--workdir", str(tmp_path / "plain"), "--out", str(tmp_path / "plain.png")]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'plain.png'}\n"
    assert (tmp_path / "plain.png").read_bytes().startswith(PNG_MAGIC)
    drawn = lines_by_key(plot.plot(tmp_path / "plain")[1])
    assert drawn["loss"] == {"lm_loss": ([1, 2], [3.0, 2.0])} and drawn["expert load balance"] == {}
    assert "policy" not in drawn

    # post-training: a supervised step, then policy steps with rewards and a held-out evaluation
    rows = [{"step": 1, "lm_loss": 2.0}, {"step": 2, "reward_mean": 0.25, "kl": 0.01},
            {"step": 3, "reward_mean": 0.5, "kl": 0.02, "eval_reward": 0.4}]
    write_metrics(tmp_path / "grpo", rows)
    drawn = lines_by_key(plot.plot(tmp_path / "grpo")[1])
    assert drawn["policy"] == {"reward_mean": ([2, 3], [0.25, 0.5]), "eval_reward": ([3], [0.4])}
    assert drawn["loss"] == {"lm_loss": ([1], [2.0]), "kl": ([2, 3], [0.01, 0.02])}


@pytest.mark.parametrize("content, message", [
    (None, "no metrics file {path}: pass the --workdir of a train.py run that has logged a step"),
    ("", "{path} is empty: the run has not logged a step yet"),
    ('{"step": 1, "lm_loss": 2.0}\n{"step": 2, lm_loss\n{"step": 3, "lm_loss": 2.0}\n',
     "{path}:2: not a JSON line (Expecting property name enclosed in double quotes)"),
    ('[1, 2]\n', "{path}:1: not a metrics line (a JSON object with an integer 'step')"),
    ('{"step": 1, "tokens_per_s": 5.0}\n', "{path} holds none of the metrics plotted (lm_loss, "),
])
def test_bad_metrics_file_is_one_error_line(tmp_path, capsys, content, message):
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_text(content)
    assert plot.main(["--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(path=path)) and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["metrics.jsonl"] if content is not None else [])


def test_plot_starts_without_jax():
    code = "import sys, v4jax.cli.plot; print(sorted(m for m in ('jax', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out
