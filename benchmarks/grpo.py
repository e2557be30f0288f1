"""itertrain's `--strategy grpo` against plain TRL `GRPOTrainer` on the same job: whole-process wall time and
peak RSS, side by side in one run (the variants alternate, their order rotating every repeat).

The job: one GRPO phase from the base model on the arithmetic task's prompts (itertrain: `--sft_max_steps 0
--num_iterations 1`), the same model, prompts (BOS in front, as itertrain feeds them), reward function
(`itertrain.tasks.arithmetic:digit_credit`), seed, steps, batch, generations, completion length, beta,
learning rate and save steps; both write the final model. itertrain adds what it always does: the recovery
plan, fsynced and checksummed checkpoints and iteration model, the lineage, metrics.jsonl.

    python benchmarks/grpo.py                      # tiny model, 8 steps, 3 repeats (a few minutes on 2 cores)
    python benchmarks/grpo.py --steps 50 --repeats 5 --hidden_size 256 --layers 4
    python benchmarks/grpo.py --baseline ARGS...   # the plain-TRL program itself (what the benchmark runs)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import PY, child_env, median, rmtree  # noqa: E402
from benchmarks.monitor import check_ok, run_monitored  # noqa: E402

REWARD = "itertrain.tasks.arithmetic:digit_credit"


def job(model: Path, prompts: Path, out: Path, ns: argparse.Namespace) -> list[str]:
    """The flags both programs take, under the same names."""
    return ["--model_name", str(model), "--prompts_file", str(prompts), "--output_dir", str(out),
            "--max_steps", str(ns.steps), "--save_steps", str(ns.save_steps), "--per_device_train_batch_size",
            str(ns.batch), "--num_generations", str(ns.generations), "--max_completion_length", "8",
            "--beta", "0.04", "--learning_rate", "1e-4", "--seed", "42", "--logging_steps", str(ns.steps)]


def itertrain_cmd(flags: list[str]) -> list[str]:
    return [PY, "-m", "itertrain", "train", "--strategy", "grpo", "--sft_max_steps", "0", "--num_iterations", "1",
            "--reward_funcs", REWARD, "--report_to", "none", "--disable_tqdm", "true", *flags]


def baseline(argv: list[str]) -> int:
    """Plain TRL: what a user without itertrain writes for the same job."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from itertrain.data import read_jsonl
    from itertrain.tasks.arithmetic import digit_credit

    p = argparse.ArgumentParser()
    for name in ("model_name", "prompts_file", "output_dir"):
        p.add_argument(f"--{name}", required=True)
    for name in ("max_steps", "save_steps", "per_device_train_batch_size", "num_generations", "max_completion_length",
                 "seed", "logging_steps"):
        p.add_argument(f"--{name}", type=int, required=True)
    for name in ("beta", "learning_rate"):
        p.add_argument(f"--{name}", type=float, required=True)
    ns = p.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(ns.model_name, local_files_only=True)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(ns.model_name, dtype=torch.float32, local_files_only=True)
    rows = read_jsonl(ns.prompts_file)
    dataset = Dataset.from_list([{**r, "prompt": tokenizer.bos_token + r["prompt"]} for r in rows])
    args = GRPOConfig(output_dir=ns.output_dir, max_steps=ns.max_steps, save_steps=ns.save_steps,
                      per_device_train_batch_size=ns.per_device_train_batch_size, num_generations=ns.num_generations,
                      max_completion_length=ns.max_completion_length, beta=ns.beta, learning_rate=ns.learning_rate,
                      seed=ns.seed, logging_steps=ns.logging_steps, bf16=False, gradient_checkpointing=False,
                      use_cpu=True, dataloader_pin_memory=False, report_to="none", disable_tqdm=True,
                      temperature=1.0, top_k=0, top_p=1.0)
    trainer = GRPOTrainer(model=model, reward_funcs=[digit_credit], args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(Path(ns.output_dir) / "final"))
    return 0


def prepare(work: Path, ns: argparse.Namespace) -> tuple[Path, Path]:
    from itertrain.tasks import get_task
    from itertrain.tiny_model import TinyModelSpec, init_model

    model = work / f"model-h{ns.hidden_size}-l{ns.layers}"
    if not (model / "config.json").exists():
        init_model(model, TinyModelSpec(hidden_size=ns.hidden_size, intermediate_size=3 * ns.hidden_size,
                                        num_hidden_layers=ns.layers, num_attention_heads=4,
                                        max_position_embeddings=64))
    prompts = work / "prompts.jsonl"
    rows = get_task("arithmetic", 0).prompts(1)
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows))
    return model, prompts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--baseline"]:
        return baseline(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--save_steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--hidden_size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default="/tmp/itertrain-bench-grpo")
    ns = p.parse_args(argv)
    work = Path(ns.work)
    work.mkdir(parents=True, exist_ok=True)
    model, prompts = prepare(work, ns)
    results: dict[str, list[tuple[float, int]]] = {"itertrain": [], "trl": []}
    for i in range(ns.repeats):
        for variant in (("itertrain", "trl") if i % 2 == 0 else ("trl", "itertrain")):
            out = work / "scratch" / variant
            rmtree(out)
            flags = job(model, prompts, out, ns)
            cmd = itertrain_cmd(flags) if variant == "itertrain" else [PY, __file__, "--baseline", *flags]
            r = run_monitored(cmd, env=child_env(), timeout=3600)
            check_ok(r, variant)
            results[variant].append((r.wall, r.maxrss_kb))
            print(f"# repeat {i} {variant}: {r.wall:.2f} s, peak RSS {r.maxrss_kb / 1024:.0f} MiB", file=sys.stderr)
    it_wall, trl_wall = (median([w for w, _ in results[v]]) for v in ("itertrain", "trl"))
    it_rss, trl_rss = (median([m for _, m in results[v]]) / 1024 for v in ("itertrain", "trl"))
    print(f"| figure (median of {ns.repeats}) | itertrain --strategy grpo | plain TRL GRPOTrainer | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| whole-process wall time | {it_wall:.2f} s | {trl_wall:.2f} s | {it_wall / trl_wall:.2f}x |")
    print(f"| peak RSS | {it_rss:.0f} MiB | {trl_rss:.0f} MiB | {it_rss / trl_rss:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
