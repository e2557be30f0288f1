"""The physical floor of any snapshot: one in-memory copy of a trainer checkpoint's tensors.

`python -m benchmarks.copy_floor MODEL_DIR [REPEATS]` loads the model, takes one AdamW step (so the
optimizer holds its two moments, as at a save), then times `copy_tree` of the model's and the
optimizer's state dicts (what `--async_save` copies at a save step):
- into a reused host buffer pool (every save after the first one of an iteration);
- into freshly allocated memory (a new pool each time: page faults and zeroing included; run with
  `MALLOC_MMAP_THRESHOLD_=131072` so that every buffer is a new mapping, not heap memory just freed).
Prints one JSON line: {"bytes": ..., "reused_s": [...], "fresh_s": [...]}. Run in its own process so
that its 2-3 GB do not stay in the benchmark runner.
"""

from __future__ import annotations

import gc
import json
import sys
import time


def main(argv: list[str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from itertrain.artifacts.snapshot import HostBufferPool, copy_tree

    repeats = int(argv[1]) if len(argv) > 1 else 5
    model = AutoModelForCausalLM.from_pretrained(argv[0], dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()

    def copy(pool: HostBufferPool) -> int:
        _, a = copy_tree(model.state_dict(), pool, "weights", {})
        _, b = copy_tree(opt.state_dict(), pool, "optimizer", {})
        return a + b

    def timed(make_pool) -> tuple[list[float], int]:
        times, nbytes = [], 0
        for _ in range(repeats):
            pool = make_pool()
            gc.collect()
            started = time.perf_counter()
            nbytes = copy(pool)
            times.append(round(time.perf_counter() - started, 4))
            del pool
        return times, nbytes

    reused = HostBufferPool()
    copy(reused)  # the first save of an iteration allocates; the figure is for the saves after it
    reused_s, nbytes = timed(lambda: reused)
    reused.release()
    fresh_s, _ = timed(HostBufferPool)
    print(json.dumps({"bytes": nbytes, "reused_s": reused_s, "fresh_s": fresh_s}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
