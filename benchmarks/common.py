"""Shared pieces of the benchmark suite: settings, the local model and data, files, statistics and output.

Nothing here is a test: the suite only prints numbers (one JSON line per figure, then a markdown table).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
HF_SCRIPT = Path(__file__).resolve().parent / "hf_train.py"
MANIFEST = "itertrain.manifest.json"  # itertrain's commit record, written last: a save is committed when it appears


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int

    @property
    def key(self) -> str:
        return (f"llama-h{self.hidden_size}-i{self.intermediate_size}-l{self.num_hidden_layers}"
                f"-a{self.num_attention_heads}")


# ~103M parameters: 411 MB of fp32 weights, 823 MB of AdamW state -> a 1.23 GB trainer checkpoint.
FULL_MODEL = ModelSpec(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16)
# ~3.4M parameters: a smoke check of the whole suite in a few minutes.
QUICK_MODEL = ModelSpec(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4)


@dataclass(frozen=True)
class Settings:
    quick: bool
    repeats: int
    work: Path  # cache and scratch root (synthetic dirs, model, checkpoints)
    cold: bool  # also measure with a dropped page cache where it matters
    model: ModelSpec
    seq_chars: int  # characters per training example (the char tokenizer: 1 token each, + BOS/EOS)
    batch_size: int
    max_steps: int  # training-overhead job
    save_steps: int
    logging_steps: int
    plan_sizes: tuple[tuple[int, int], ...]  # (trainer checkpoints, iteration models)
    verbose: bool = False

    @classmethod
    def make(cls, quick: bool, repeats: int | None, work: Path | None, cold: bool, verbose: bool) -> "Settings":
        work = Path(work or os.environ.get("ITERTRAIN_BENCH_DIR") or "/tmp/itertrain-bench")
        if quick:
            return cls(quick, repeats or 3, work, cold, QUICK_MODEL, seq_chars=62, batch_size=1, max_steps=30,
                       save_steps=10, logging_steps=5, plan_sizes=((100, 10), (1000, 100)), verbose=verbose)
        return cls(quick, repeats or 5, work, cold, FULL_MODEL, seq_chars=62, batch_size=1, max_steps=100,
                   save_steps=50, logging_steps=10, plan_sizes=((100, 10), (1000, 100), (10000, 1000)), verbose=verbose)


def child_env(**extra: str) -> dict[str, str]:
    """Environment of every measured process (both variants get exactly this).

    One intra-op thread: on this 2-core machine shared with other work, torch's default of 2 OpenMP
    threads spins against the other load and makes a training step ~10x slower and far noisier.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ITERTRAIN_FAULT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONPATH": str(REPO)})
    env.update(extra)
    return env


def log(s: Settings | None, msg: str) -> None:
    print(f"# {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# local model and data (nothing is downloaded)
# ---------------------------------------------------------------------------------------------
def make_model(spec: ModelSpec, root: Path) -> Path:
    """A randomly initialised Llama built from a LlamaConfig + the character tokenizer of
    `itertrain init-model`, saved as a normal HF model directory. Cached under `root`."""
    out = root / "models" / spec.key
    if (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists():
        return out
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from itertrain.tiny_model import build_tokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def make_data(root: Path, seq_chars: int, rows: int = 2000) -> Path:
    """JSONL `text` rows of random characters, all the same length (every batch costs the same)."""
    path = root / "data" / f"train-{seq_chars}-{rows}.jsonl"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789+-=*"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(seq_chars))}) + "\n")
    tmp.rename(path)
    return path


def job_flags(s: Settings, model: Path, data: Path, output_dir: Path, *, max_steps: int, save_steps: int,
              logging_steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    """The flags both variants get: the same model, data, seed, steps, save_steps, batch, dtype (fp32)."""
    return [
        "--model_name", str(model), "--train_file", str(data), "--output_dir", str(output_dir),
        "--max_steps", str(max_steps), "--save_steps", str(save_steps), "--save_strategy", "steps",
        "--per_device_train_batch_size", str(s.batch_size), "--logging_steps", str(logging_steps),
        "--learning_rate", "1e-4", "--seed", "42", "--disable_tqdm", "true", "--report_to", "none",
        "--use_cpu", "true", "--dataloader_pin_memory", "false", *extra,
    ]


def scratch_job(s: Settings, name: str, **job: Any) -> tuple[Path, list[str]]:
    """The output dir `name` under the scratch root, emptied, and the flags of a job on the benchmark's model and
    data that writes into it (`job`: `job_flags`'s keywords)."""
    out = s.work / "scratch" / name
    rmtree(out)
    return out, job_flags(s, make_model(s.model, s.work), make_data(s.work, s.seq_chars), out, **job)


def itertrain_cmd(flags: list[str]) -> list[str]:
    return [PY, "-m", "itertrain", "train", *flags, "--num_iterations", "1"]


def hf_cmd(flags: list[str], resume: bool = False) -> list[str]:
    return [PY, str(HF_SCRIPT), *flags, *(["--resume"] if resume else [])]


# ---------------------------------------------------------------------------------------------
# page cache and files
# ---------------------------------------------------------------------------------------------
COLD_SETTLE_S = 5.0


def drop_caches(settle: float = COLD_SETTLE_S) -> bool:
    """sync + drop the page cache (root only), then wait `settle` seconds. True when it worked.

    The wait matters on this VM: memory freed by the drop is handed back to the host after a second
    or two, and a read that starts before that runs ~3x faster (0.19 s vs 0.6 s for 411 MB) than one
    that starts after. Waiting puts every cold measurement in the same, fully cold, state.
    """
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    time.sleep(settle)
    return True


def link_tree(src: Path, dst: Path, min_link: int = 1 << 20) -> None:
    """Copy a tree, hard-linking files >= min_link bytes (never modified in place by either tool:
    both write new files or rename), copying small ones (the lock file, records) for real."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        target = dst / rel if rel != "." else dst
        target.mkdir(parents=True, exist_ok=True)
        for name in filenames:
            a, b = Path(dirpath) / name, target / name
            if a.stat().st_size >= min_link:
                os.link(a, b)
            else:
                shutil.copy2(a, b)


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# statistics and output
# ---------------------------------------------------------------------------------------------
def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> str:
    return f"{min(xs):.3g}–{max(xs):.3g}" if xs else "—"


@dataclass
class Figure:
    figure: str
    itertrain: float | None
    baseline: float | None
    ratio: float | None
    target: str
    met: bool | None
    n: int
    unit: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def emit(self) -> None:
        d = asdict(self)
        for k in ("itertrain", "baseline", "ratio"):
            if isinstance(d[k], float):
                d[k] = round(d[k], 4)
        print(json.dumps(d, default=str), flush=True)


def ratio_figure(name: str, it: list[float], base: list[float], *, target: str, unit: str,
                 higher_is_better: bool = False, limit: float | None = None, detail: dict | None = None,
                 paired: bool = True) -> Figure:
    """A figure from interleaved samples: medians of both, ratio = median(itertrain)/median(baseline).
    With `paired`, the median of the per-pair ratios is added to the detail (robust to drift)."""
    mi, mb = median(it), median(base)
    r = mi / mb if mb else None
    d = dict(detail or {})
    d["itertrain_range"] = spread(it)
    d["baseline_range"] = spread(base)
    if paired and len(it) == len(base) and it:
        d["median_of_pair_ratios"] = round(median([a / b for a, b in zip(it, base) if b]), 4)
    met = None
    if limit is not None and r is not None:
        met = r >= limit if higher_is_better else r <= limit
    return Figure(name, mi, mb, r, target, met, min(len(it), len(base)), unit, d)


def markdown_table(figs: list[Figure]) -> str:
    def fmt(x: Any) -> str:
        if x is None:
            return "—"
        if isinstance(x, float):
            return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)

    rows = ["| figure | itertrain | baseline | ratio | target | met | n |",
            "| --- | ---: | ---: | ---: | --- | --- | ---: |"]
    for f in figs:
        met = "—" if f.met is None else ("✅ yes" if f.met else "❌ no")
        unit = f" {f.unit}" if f.unit else ""
        it = fmt(f.itertrain) + (unit if f.itertrain is not None else "")
        base = fmt(f.baseline) + (unit if f.baseline is not None else "")
        ratio = f"{f.ratio:.3f}x" if f.ratio is not None else "—"
        rows.append(f"| {f.figure} | {it} | {base} | {ratio} | {f.target} | {met} | {f.n} |")
    return "\n".join(rows)
