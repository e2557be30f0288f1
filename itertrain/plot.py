"""Per-iteration metrics: a markdown table for the terminal and a PNG (`itertrain plot DIR`)."""

from __future__ import annotations

import json
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from itertrain.errors import UsageError


def read_metrics(exp_dir: Path) -> list[dict[str, Any]]:
    path = Path(exp_dir) / "runs" / "metrics.jsonl"
    if not Path(exp_dir).is_dir():
        raise UsageError(f"{exp_dir} is not a directory: pass an experiment's --output_dir")
    if not path.exists():
        raise UsageError(f"{path} does not exist: no iteration of this experiment has committed yet")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _accuracy_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for r in rows for k in r if k.startswith("accuracy_")},
                  key=lambda k: (len(k), k))
    return keys


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    return format(row[key], fmt) if row.get(key) is not None else "—"


def metrics_table(exp_dir: Path) -> str:
    """Markdown table: samples; acceptance rate and distinct samples kept (expert iteration) or mean reward
    and preference pairs (iterative DPO); train loss; held-out accuracy per difficulty; wall time."""
    rows = read_metrics(exp_dir)
    acc = _accuracy_keys(rows)
    data: list[tuple[str, str, str]] = []  # (column, metric, format) of the strategy's data
    if any("acceptance_rate" in r for r in rows):
        data += [("accepted", "acceptance_rate", ".1%"), ("kept", "accepted", "")]
    if any("pairs" in r for r in rows):
        data += [("mean reward", "mean_reward", ".3f"), ("pairs", "pairs", "")]
    head = ["iter", "samples", *[c for c, _, _ in data], "train loss", *[k.removeprefix("accuracy_") + " acc" for k in acc],
            "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            str(r["iteration"]),
            _cell(r, "samples", ""),
            *[_cell(r, key, fmt) for _, key, fmt in data],
            _cell(r, "train_loss", ".3f"),
            *[_cell(r, k, ".0%") for k in acc],
            f"{r.get('wall_time_s', 0):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_metrics(exp_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(exp_dir)
    its = [r["iteration"] for r in rows]
    acc = _accuracy_keys(rows)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for k in acc:
        axes[0].plot(its, [r.get(k) for r in rows], marker="o", label=k.removeprefix("accuracy_"))
    axes[0].set(title="held-out exact-match accuracy", xlabel="iteration", ylim=(-0.02, 1.02))
    if acc:
        axes[0].legend(fontsize=8)
    axes[1].plot(its, [r.get("train_loss") for r in rows], marker="o", label="train loss")
    if any("eval_loss" in r for r in rows):
        axes[1].plot(its, [r.get("eval_loss") for r in rows], marker="o", label="eval loss")
    axes[1].set(title="loss", xlabel="iteration")
    axes[1].legend(fontsize=8)
    if any("pairs" in r for r in rows):  # iterative DPO: how much of the sampled data gave preference pairs
        axes[2].bar(its, [r.get("pair_rate", 0) or 0 for r in rows], label="prompts with a pair")
        rewards = [r.get("mean_reward") for r in rows]
        axes[2].plot(its, rewards, marker="o", color="C1", label="mean reward")
        axes[2].set(title="sampled answers", xlabel="iteration")
        if all(v is None or 0 <= v <= 1 for v in rewards):
            axes[2].set_ylim(0, 1)
        axes[2].legend(fontsize=8)
    else:
        axes[2].bar(its, [r.get("acceptance_rate", 0) or 0 for r in rows])
        axes[2].set(title="acceptance rate of sampled answers", xlabel="iteration", ylim=(0, 1))
    for ax in axes:
        ax.set_xticks(its)
        ax.grid(alpha=0.3)
    fig.suptitle(str(exp_dir))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_command(argv: list[str]) -> int:
    p = ArgumentParser(prog="itertrain plot")
    p.add_argument("output_dir")
    p.add_argument("--out", default=None, help="PNG path (default OUTPUT_DIR/runs/metrics.png)")
    ns = p.parse_args(argv)
    out = plot_metrics(Path(ns.output_dir), Path(ns.out) if ns.out else Path(ns.output_dir) / "runs" / "metrics.png")
    print(metrics_table(Path(ns.output_dir)))
    print(f"wrote {out}")
    return 0
