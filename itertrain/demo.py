"""`itertrain demo`: the main job. Expert iteration on the built-in arithmetic task, on CPU, in minutes.

Creates a tiny model, runs iteration 0 (supervised, 1-3 digit additions) and six expert iterations
(sampling answers to unlabeled 4- to 6-digit additions, at the difficulties the task's curriculum picks
from the model's pass rates, keeping the verified answers, training on them), evaluates each iteration's
model on held-out problems (greedy accuracy per number of digits; sampled mean reward and pass@k on
OUTPUT_DIR/eval-prompts.jsonl), prints a per-iteration table and writes the plot. Rerunning it resumes (or reports complete).
`--strategy iterative_dpo` runs the same iteration 0 and samples the same problems, then trains each
later iteration with DPO on (right answer, wrong answer) pairs instead; `--strategy grpo` with GRPO.
"""

from __future__ import annotations

from argparse import ArgumentParser
from pathlib import Path

from itertrain.args import TRL_NAMES
from itertrain.errors import UsageError
from itertrain.layout import DEMO_DPO_EXPERIMENT, DEMO_EXPERIMENT, DEMO_GRPO_EXPERIMENT
from itertrain.tiny_model import TinyModelSpec

# The demo's model: small enough for a 2-core CPU, large enough to learn multi-digit addition.
DEMO_MODEL = TinyModelSpec(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64)

# The demo's flags: read as an ordinary `itertrain train` command line.
COMMON_FLAGS = [
    "--task", "arithmetic",
    "--num_generations", "8",
    "--temperature", "1.0",
    "--max_completion_length", "8",
    "--generation_batch_size", "1000",
    "--per_device_train_batch_size", "64",
    "--warmup_steps", "60",
    "--weight_decay", "0.0",
    "--lr_scheduler_type", "cosine",
    "--seed", "0",
    "--resume_from", "auto",
    "--resume_from_iteration", "auto",
]
DEMO_FLAGS = [
    "--strategy", "expert_iteration",
    *COMMON_FLAGS,
    "--num_iterations", "7",
    "--data_policy", "cumulative",
    "--sft_max_steps", "800",
    # six short expert iterations rather than five of 400 steps: the curriculum re-decides more often for the same
    # time (AVX2 kernels, seed 0: 5-digit 36 % after 5 x 400 steps, 47 % after 6 x 300; docs/demo.md)
    "--max_steps", "300",
    "--learning_rate", "3e-3",
    "--save_steps", "150",
    "--logging_steps", "100",
]
# Iteration 0 is the expert-iteration demo's (same steps, rate and seed: the same iter_0); the DPO
# iterations train on (right, wrong) answer pairs with DPO plus an NLL term on the right answer
# (TRL's loss_type "sigmoid" + "sft": iterative RPO, Pang et al. 2024).
DPO_DEMO_FLAGS = [
    "--strategy", "iterative_dpo",
    *COMMON_FLAGS,
    "--num_iterations", "4",
    "--sft_max_steps", "800",
    "--sft_learning_rate", "3e-3",
    "--max_steps", "300",
    "--learning_rate", "1e-3",
    "--beta", "0.1",
    "--loss_type", "sigmoid", "sft",
    "--save_steps", "400",
    "--logging_steps", "100",
]
# GRPO: the same iteration 0 and problems, at the difficulties the curriculum picks from the starting model's pass
# rates; each later iteration is a GRPO phase on TRL's GRPOTrainer (8 completions per prompt, partial credit per
# answer digit, a KL penalty against the iteration's starting model).
GRPO_DEMO_FLAGS = [
    "--strategy", "grpo",
    *COMMON_FLAGS,
    "--num_iterations", "4",
    "--sft_max_steps", "800",
    "--sft_learning_rate", "3e-3",
    "--reward_funcs", "itertrain.tasks.arithmetic:digit_credit",
    "--max_steps", "150",
    "--learning_rate", "3e-4",  # 1e-4 reached 20% on 4 digits after 3 iterations, 3e-4 34% (same iter_0, same time)
    "--beta", "0.04",
    "--save_steps", "50",
    "--logging_steps", "10",
]
STRATEGIES = {"expert_iteration": (DEMO_EXPERIMENT, DEMO_FLAGS), "iterative_dpo": (DEMO_DPO_EXPERIMENT, DPO_DEMO_FLAGS),
              "grpo": (DEMO_GRPO_EXPERIMENT, GRPO_DEMO_FLAGS)}


EVAL_PER_LEVEL = 50  # held-out problems per number of digits in the demo's --eval_prompts_file


def write_eval_prompts(root: Path, seed: int) -> Path:
    """ROOT/eval-prompts.jsonl: the first EVAL_PER_LEVEL problems of each of the task's held-out sets (never
    trained on), for the held-out mean reward and pass@k of every iteration. Written only when it differs."""
    import json

    from itertrain.tasks.arithmetic import ArithmeticTask

    rows = [r for level in ArithmeticTask(seed=seed).heldout_sets().values() for r in level[:EVAL_PER_LEVEL]]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path = root / "eval-prompts.jsonl"
    if not path.is_file() or path.read_text() != text:
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def _setting(arg: str) -> str:
    """The setting a flag names, under TRL's name (`--samples_per_prompt` and `--num_generations`: one)."""
    name = arg[2:].split("=", 1)[0].replace("-", "_")
    return TRL_NAMES.get(name, name)


def without_overridden(own: list[str], extra: list[str]) -> list[str]:
    """The demo's own flags (each with its values) less the settings the user's flags give under either name:
    the user's value wins, and the parser refuses one setting given under both of its names."""
    given = {_setting(a) for a in extra if a.startswith("--")}
    kept, dropping = [], False
    for arg in own:
        if arg.startswith("--"):
            dropping = _setting(arg) in given
        if not dropping:
            kept.append(arg)
    return kept


def demo(argv: list[str]) -> int:
    p = ArgumentParser(
        prog="itertrain demo", allow_abbrev=False,
        description="The built-in demo: expert iteration (or, with --strategy iterative_dpo or grpo, iterative DPO or "
                    "GRPO) on the "
                    "arithmetic task with a tiny model, on CPU. Every `itertrain train` flag passes through and "
                    "overrides the demo's own (e.g. --num_iterations 5, --seed 1, --max_steps 400); "
                    "`itertrain train --help` lists them.",
    )
    p.add_argument("--output_dir", default="itertrain-demo",
                   help="where the model (OUTPUT_DIR/tiny-model) and the experiment (OUTPUT_DIR/experiment, "
                        "OUTPUT_DIR/experiment-dpo for iterative_dpo, OUTPUT_DIR/experiment-grpo for grpo) go")
    p.add_argument("--strategy", default="expert_iteration", choices=sorted(STRATEGIES),
                   help="expert_iteration (the default), iterative_dpo (the same iteration 0 and problems, then DPO "
                        "on right/wrong answer pairs) or grpo (then GRPO on TRL's GRPOTrainer); the last two need "
                        "itertrain[dpo]")
    ns, extra = p.parse_known_args(argv)
    root = Path(ns.output_dir)
    model_dir = root / "tiny-model"
    exp_name, flags = STRATEGIES[ns.strategy]
    exp_dir = root / exp_name
    if not (model_dir / "config.json").exists():
        from itertrain.tiny_model import init_model

        if model_dir.exists() and any(model_dir.iterdir()):
            raise UsageError(f"{model_dir} exists but holds no model; remove it and rerun the demo")
        init_model(model_dir, DEMO_MODEL)
        print(f"created the tiny model in {model_dir}")
    from itertrain.loop import run_experiment
    from itertrain.parser import parse_train_args

    own = ["--model_name_or_path", str(model_dir), "--output_dir", str(exp_dir), *flags]
    cfg = parse_train_args([*without_overridden(own, extra), *extra])
    if cfg.generation.eval_prompts_file is None:  # the held-out figures of the demo's table (unless given)
        cfg.generation.eval_prompts_file = str(write_eval_prompts(root, cfg.training.seed))
    code = run_experiment(cfg)
    if code == 0:
        from itertrain.plot import metrics_table, plot_metrics

        print()
        print(metrics_table(exp_dir))
        png = plot_metrics(exp_dir, exp_dir / "runs" / "metrics.png")
        print(f"\nplot: {png}\nresume or inspect: itertrain status {exp_dir}")
    return code
