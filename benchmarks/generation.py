"""Samples per second of HF `generate()` against vLLM, through itertrain's two generation backends, and the
wall time of one whole expert iteration with each. Needs .venv-vllm (scripts/setup_vllm.sh):

    .venv-vllm/bin/python benchmarks/generation.py                  # demo model + the 103M Llama, iterations
    .venv-vllm/bin/python benchmarks/generation.py --only demo      # one model (demo | 103m | iteration)

Both backends run in a child process of their own, pinned to the same core(s) (--cores, default the first
one), with one intra-op thread, on the same arithmetic prompts at temperature 1 (WORKLOADS: the demo's
generate stage; 64 prompts x 8 samples x 32 new tokens on the 103M Llama). vLLM's figure is the sampling
call alone, with the engine's start-up given beside it (the engine starts once per generate stage).
Prints one JSON line per figure, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# model -> (prompts, samples per prompt, new tokens, requests per batch): the demo's generate stage (its task's
# 4,000 prompts, its flags), and the 103M Llama at 64 prompts x 8 samples x 32 new tokens in one batch.
WORKLOADS = {"demo": (4000, 8, 8, 1000), "103m": (64, 8, 32, 512)}


def _prompts(n: int) -> list[str]:
    import random

    rng = random.Random(0)
    return [f"{rng.randint(0, 999)}+{rng.randint(0, 999)}=" for _ in range(n)]


def _measure(backend: str, model_dir: str, workload: str) -> dict:
    """In the child: load, sample once to warm up (a few prompts), then time the whole sampling call."""
    from transformers import AutoTokenizer

    from itertrain.generation import Sampling

    n_prompts, samples, new_tokens, batch = WORKLOADS[workload]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sampling = Sampling(samples_per_prompt=samples, temperature=1.0, max_new_tokens=new_tokens, batch_size=batch,
                        seed_parts=(0, 1), progress=False)
    prompts = _prompts(n_prompts)
    if backend == "hf":
        from transformers import AutoModelForCausalLM

        from itertrain.generation import sample_completions

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        sample_completions(model, tokenizer, prompts[:2], **{**sampling.kwargs(), "samples_per_prompt": 1})
        t = time.perf_counter()
        outs = sample_completions(model, tokenizer, prompts, **sampling.kwargs())
        seconds, startup = time.perf_counter() - t, 0.0
    else:
        from itertrain.generation import vllm
        from itertrain.generation.common import example_seed

        t = time.perf_counter()
        llm = vllm._engine(vllm.EngineModel(Path(model_dir), Path(model_dir)), vllm.EngineOptions())
        startup = time.perf_counter() - t
        from vllm.inputs import TokensPrompt

        ids = [tokenizer(tokenizer.bos_token + p, add_special_tokens=False)["input_ids"] for p in prompts]
        requests = [(TokensPrompt(prompt_token_ids=i), vllm._sampling_params(example_seed(0, 1, n, s), 1.0, 1.0, 0,
                                                                            new_tokens, tokenizer.eos_token_id))
                    for n, i in enumerate(ids) for s in range(samples)]
        llm.generate([r[0] for r in requests[:2]], [r[1] for r in requests[:2]], use_tqdm=False)
        t = time.perf_counter()
        outs = []
        for first in range(0, len(requests), batch):  # the same batches as itertrain's vLLM backend calls
            done = llm.generate([r[0] for r in requests[first:first + batch]],
                                [r[1] for r in requests[first:first + batch]], use_tqdm=False)
            outs += [[tokenizer.decode(list(d.outputs[0].token_ids), skip_special_tokens=True)] for d in done]
        seconds = time.perf_counter() - t
    n = sum(map(len, outs))
    shape = dict(zip(("prompts", "samples_per_prompt", "new_tokens", "batch"), WORKLOADS[workload]))
    return {"backend": backend, "workload": shape, "samples": n, "seconds": round(seconds, 2),
            "samples_per_s": round(n / seconds, 2), "engine_start_s": round(startup, 1)}


def _child_env(cores: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    n = str(len(_core_list(cores)))
    env.update({"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO)})
    return env


def _core_list(cores: str) -> list[int]:
    out: list[int] = []
    for part in cores.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def _run_child(args: list[str], cores: str) -> dict:
    cmd = ["taskset", "-c", cores, sys.executable, __file__, *args] if shutil.which("taskset") else \
        [sys.executable, __file__, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(cores), timeout=3600)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(args)} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(lines[-1])


def _model(work: Path, name: str) -> Path:
    from itertrain.demo import DEMO_MODEL
    from itertrain.tiny_model import TinyModelSpec, init_model

    specs = {"demo": DEMO_MODEL, "103m": TinyModelSpec(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                                       num_attention_heads=16)}
    directory = work / f"model-{name}"
    if not (directory / "config.json").exists():
        shutil.rmtree(directory, ignore_errors=True)
        init_model(directory, specs[name])
    return directory


def _iteration(work: Path, backend: str, cores: str) -> dict:
    """Wall time of iteration 1 (generate -> train -> evaluate -> commit) of a demo-sized expert iteration."""
    out = work / f"iteration-{backend}"
    shutil.rmtree(out, ignore_errors=True)
    from itertrain.demo import DEMO_FLAGS

    flags = [f for f in DEMO_FLAGS]
    for flag, value in (("--num_iterations", "2"), ("--max_steps", "200"), ("--save_steps", "200")):
        flags[flags.index(flag) + 1] = value
    cmd = [sys.executable, "-m", "itertrain", "train", "--model_name", str(_model(work, "demo")), "--output_dir", str(out),
           *flags, "--disable_tqdm", "true", "--report_to", "none", "--generation_backend", backend]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", cores, *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(cores), timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"iteration run ({backend}) failed:\n{r.stderr[-3000:]}")
    metrics = json.loads((out / "iter_1" / "itertrain.manifest.json").read_text())["extra"]["metrics"]
    return {"backend": backend, "iteration_1_wall_s": metrics["wall_time_s"], "accuracy": {
        k: v for k, v in metrics.items() if k.startswith("accuracy_")}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="demo,103m,iteration")
    p.add_argument("--cores", default="0", help="CPU cores both backends are pinned to (taskset list, e.g. 0 or 0-1)")
    p.add_argument("--work", default=None)
    p.add_argument("--child", nargs=3, metavar=("BACKEND", "MODEL_DIR", "WORKLOAD"), help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.child:
        print(json.dumps(_measure(*ns.child)), flush=True)
        return 0
    work = Path(ns.work or tempfile.gettempdir()) / "itertrain-bench-generation"
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(json.dumps({"cores": ns.cores, "loadavg": load}), flush=True)
    rows = []
    for name in [m for m in ("demo", "103m") if m in ns.only.split(",")]:
        model = _model(work, name)
        figures = {b: _run_child(["--child", b, str(model), name], ns.cores) for b in ("hf", "vllm")}
        for figure in figures.values():
            print(json.dumps({"model": name, **figure}), flush=True)
        ratio = figures["vllm"]["samples_per_s"] / figures["hf"]["samples_per_s"]
        rows.append(f"| {name} | {figures['hf']['samples_per_s']} | {figures['vllm']['samples_per_s']} | {ratio:.2f}x | "
                    f"{figures['vllm']['engine_start_s']} s |")
    iterations = [_iteration(work, b, ns.cores) for b in ("hf", "vllm")] if "iteration" in ns.only.split(",") else []
    for figure in iterations:
        print(json.dumps(figure), flush=True)
    print("\n| model | HF generate (samples/s) | vLLM (samples/s) | vLLM / HF | vLLM engine start |\n|---|---|---|---|---|")
    print("\n".join(rows))
    if iterations:
        print("\n| backend | one expert iteration (s) |\n|---|---|")
        print("\n".join(f"| {f['backend']} | {f['iteration_1_wall_s']} |" for f in iterations))
    print(f"\nload average at the start: {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
