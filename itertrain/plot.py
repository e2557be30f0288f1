"""Per-iteration metrics: a markdown table for the terminal and a PNG (`itertrain plot DIR`).

Panels are drawn only for what the experiment recorded: held-out accuracy (built-in tasks), losses
(train, eval, eval on training rows), the share of sampled answers kept (expert iteration) or the
preference pairs and the mean reward of the samples (iterative DPO), pass@k and the mean reward on
held-out prompts (--eval_prompts_file), each with labeled axes and a scale that shows small values.
"""

from __future__ import annotations

import json
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from itertrain.errors import UsageError
from itertrain.layout import RUNS_DIR, experiment_dir
from itertrain.tasks.curriculum import describe


def read_metrics(exp_dir: Path) -> list[dict[str, Any]]:
    exp_dir = experiment_dir(exp_dir)
    path = exp_dir / RUNS_DIR / "metrics.jsonl"
    if not path.exists():
        raise UsageError(f"{path} does not exist: no iteration of this experiment has committed yet")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _accuracy_keys(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({k for r in rows for k in r if k.startswith("accuracy_")}, key=lambda k: (len(k), k))


HELDOUT = "heldout_"  # --eval_prompts_file: itertrain.heldout's figures


def _pass_keys(rows: list[dict[str, Any]]) -> list[str]:
    """heldout_pass_at_K keys, by K."""
    keys = {k for r in rows for k in r if k.startswith(HELDOUT + "pass_at_")}
    return sorted(keys, key=lambda k: int(k.rsplit("_", 1)[1]))


def _cell(row: dict[str, Any], key: str, fmt: str = "") -> str:
    return format(row[key], fmt) if row.get(key) is not None else "—"


def metrics_table(exp_dir: Path) -> str:
    """Markdown table: the prompts' difficulties (adaptive curriculum); samples; acceptance rate and distinct
    samples kept (expert iteration), mean reward and preference pairs (iterative DPO), or mean reward and KL
    (grpo, rloo); train loss;
    held-out accuracy per difficulty; wall time."""
    rows = read_metrics(exp_dir)
    acc = _accuracy_keys(rows)
    columns: list[tuple[str, str, str]] = []  # (heading, metric, format) of the sampled data
    if any("samples" in r for r in rows):
        columns.append(("samples", "samples", ""))
        if any("pairs" in r for r in rows):
            columns += [("mean reward", "mean_reward", ".3f"), ("pairs", "pairs", "")]
        else:
            columns += [("accepted", "acceptance_rate", ".1%"), ("kept", "accepted", "")]
    if any("reward" in r and "kl" in r for r in rows):  # online RL (grpo, rloo): TRL's means over the iteration
        columns += [("mean reward", "reward", ".3f"), ("kl", "kl", ".4f")]
    mixed = any("curriculum" in r for r in rows)  # the task's adaptive curriculum: prompts per number of digits
    passes = _pass_keys(rows)
    passes = list(dict.fromkeys(passes[:1] + passes[-1:]))  # pass@1 and pass@n (the plot draws every k)
    heldout = ([("heldout reward", HELDOUT + "mean_reward", ".3f")] if any(HELDOUT + "mean_reward" in r for r in rows)
               else []) + [("heldout pass@" + k.rsplit("_", 1)[1], k, ".1%") for k in passes]
    head = ["iter", *(["prompts by digits"] if mixed else []), *[c for c, _, _ in columns], "train loss",
            *[k.removeprefix("accuracy_") + " acc" for k in acc], *[c for c, _, _ in heldout],
            "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            str(r["iteration"]),
            *([describe(r["curriculum"], rates=False) if "curriculum" in r else "—"] if mixed else []),
            *[_cell(r, key, fmt) for _, key, fmt in columns],
            _cell(r, "train_loss", ".3f"),
            *[_cell(r, k, ".0%") for k in acc],
            *[_cell(r, key, fmt) for _, key, fmt in heldout],
            f"{r.get('wall_time_s', 0):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_LOSSES = (("train_loss", "train loss (mean over the iteration)"), ("eval_loss", "held-out loss"),
           ("eval_train_loss", "loss on training rows"))


# Figures the built-in panels draw, or bookkeeping: everything else numeric is a plug-in's metric.
_KNOWN = {"iteration", "steps", "wall_time_s", "samples", "accepted", "acceptance_rate", "pairs", "pair_rate",
          "mean_reward", "mean_margin", "prompts", "prompts_solved", "train_loss_this_launch"}


def plugin_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Numeric metrics no built-in panel draws (a strategy's `task_metrics`, its generate stats)."""
    known = _KNOWN | {k for k, _ in _LOSSES} | set(_accuracy_keys(rows))
    return sorted({k for r in rows for k, v in r.items()
                   if k not in known and not k.startswith(("eval_", HELDOUT))  # the trainer's; the held-out panel's
                   and not k.endswith(("_runtime", "_per_second"))
                   and isinstance(v, (int, float)) and not isinstance(v, bool)})


def loss_series(rows: list[dict[str, Any]]) -> list[tuple[str, list[float | None]]]:
    """(label, value per row) of each loss line. In iterative DPO the SFT iteration's loss and the DPO
    iterations' loss are different quantities: two lines, never one."""
    dpo = [("pairs" in r) for r in rows]
    series = []
    for key, label in _LOSSES:
        if not any(key in r for r in rows):
            continue
        if any(dpo):
            for kind, is_dpo in (("SFT", False), ("DPO", True)):
                values = [r.get(key) if d == is_dpo else None for r, d in zip(rows, dpo)]
                if any(v is not None for v in values):
                    series.append((f"{label}, {kind}", values))
        else:
            series.append((label, [r.get(key) for r in rows]))
    return series


def panels(rows: list[dict[str, Any]]) -> list[str]:
    """The panels worth drawing for these rows: only what the experiment recorded."""
    shown = {"accuracy": bool(_accuracy_keys(rows)), "loss": any(k in r for k, _ in _LOSSES for r in rows),
             "rate": any(r.get("acceptance_rate") is not None for r in rows),
             "pairs": any(r.get("pairs") is not None for r in rows),
             "heldout": any(k.startswith(HELDOUT) for r in rows for k in r), "plugin": bool(plugin_keys(rows))}
    return [name for name, show in shown.items() if show]


def plot_metrics(exp_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exp_dir = experiment_dir(exp_dir)
    rows = read_metrics(exp_dir)
    its = [r["iteration"] for r in rows]
    acc = _accuracy_keys(rows)
    rates = [r.get("acceptance_rate") for r in rows]
    names = panels(rows)
    fig, axes = plt.subplots(1, len(names), figsize=(4.4 * len(names), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], names):
        if panel == "accuracy":
            for k in acc:
                ax.plot(its, [r.get(k) for r in rows], marker="o", label=k.removeprefix("accuracy_"))
            ax.set(title="held-out exact-match accuracy", ylabel="accuracy (share of problems)", ylim=(-0.02, 1.02))
            ax.legend(fontsize=8, title="operand digits", title_fontsize=8)
        elif panel == "loss":
            for label, values in loss_series(rows):
                ax.plot(its, values, marker="o", label=label)
            dpo = any("pairs" in r for r in rows)  # iteration 0 is SFT, the later ones DPO
            ax.set(title="loss", ylabel="SFT: cross-entropy per token; DPO: its loss" if dpo else "cross-entropy per token")
            ax.legend(fontsize=8)
        elif panel == "heldout":
            _heldout_panel(ax, its, rows)
        elif panel == "plugin":
            for k in plugin_keys(rows):
                ax.plot(its, [r.get(k) for r in rows], marker="o", label=k)
            ax.set(title="other metrics (strategy, task)", ylabel="value")
            ax.legend(fontsize=8)
        elif panel == "pairs":
            ax.bar(its, [r.get("pair_rate") or 0.0 for r in rows], label="prompts that gave a pair")
            rewards = [r.get("mean_reward") for r in rows]
            ax.plot(its, rewards, marker="o", color="C1", label="mean reward of the samples")
            if all(v is None or 0 <= v <= 1 for v in rewards):
                ax.set_ylim(0, 1)
            ax.set(title="sampled answers: preference pairs", ylabel="share of prompts / reward")
            ax.legend(fontsize=8)
        else:
            shown = [v if v is not None else 0.0 for v in rates]
            bars = ax.bar(its, shown)
            for bar, v in zip(bars, rates):
                if v is not None:
                    ax.annotate(f"{v:.2%}" if v < 0.01 else f"{v:.1%}", (bar.get_x() + bar.get_width() / 2, v),
                                ha="center", va="bottom", fontsize=8)
            positive = [v for v in shown if v > 0]
            if positive and max(positive) / min(positive) > 100:
                ax.set_yscale("log")  # 0.0125% and 20% on one axis: a linear scale hides the small one
            else:
                ax.set_ylim(0, max(shown + [0.01]) * 1.25)
            ax.set(title="sampled answers that passed the verifier", ylabel="share of samples")
        ax.set_xlabel("iteration")
        ax.set_xticks(its)
        ax.grid(alpha=0.3)
    fig.suptitle(str(exp_dir))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _heldout_panel(ax: Any, its: list[int], rows: list[dict[str, Any]]) -> None:
    """pass@k per k, and the mean reward on its own axis (a reward has its own scale)."""
    for k in _pass_keys(rows):
        ax.plot(its, [r.get(k) for r in rows], marker="o", label="pass@" + k.rsplit("_", 1)[1])
    ax.set(title="held-out prompts (--eval_prompts_file)", ylabel="pass@k (share of prompts)", ylim=(-0.02, 1.02))
    handles, labels = ax.get_legend_handles_labels()
    rewards = [r.get(HELDOUT + "mean_reward") for r in rows]
    if any(v is not None for v in rewards):
        twin = ax.twinx()
        twin.plot(its, rewards, marker="s", linestyle="--", color="C7", label="mean reward")
        twin.set_ylabel("mean reward")
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=8)


def plot_command(argv: list[str]) -> int:
    p = ArgumentParser(prog="itertrain plot", allow_abbrev=False,
                       description="Draw an experiment's per-iteration metrics as a PNG and print them as a table.")
    p.add_argument("output_dir", help="the experiment's --output_dir (or a demo's --output_dir)")
    p.add_argument("--out", default=None, help="PNG path (default OUTPUT_DIR/runs/metrics.png)")
    ns = p.parse_args(argv)
    exp = experiment_dir(ns.output_dir)
    out = plot_metrics(exp, Path(ns.out) if ns.out else exp / RUNS_DIR / "metrics.png")
    print(metrics_table(exp))
    print(f"wrote {out}")
    return 0
