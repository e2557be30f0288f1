"""Peak RSS during save and during resume, itertrain vs plain HF, from the runs of the training-overhead
and resume figures (measured once, reported twice).

- save: for every checkpoint save, the parent resets the child's peak-RSS mark (`echo 5 >
  /proc/PID/clear_refs`) when `checkpoint-S/` appears and reads VmHWM when the save is over
  (HF: `trainer_state.json`, its last file; itertrain: the manifest, after hashing and fsync). The
  figure is the median over runs of the largest save-window peak of each run.
- resume: VmHWM (a fresh process: launch -> now) when the first step after the resume is logged,
  i.e. the peak of the whole resume including the first step (warm page cache runs). The first
  step is included because transformers 5 materialises lazily loaded (mmap-backed) weights only
  when they are first written; at `***** Running training *****` (shown as info) itertrain's
  weights are still partly file-backed and not yet counted.
- whole-process peaks (wait4's ru_maxrss) are added as info.
"""

from __future__ import annotations

from benchmarks import resume_latency, train_overhead
from benchmarks.common import Figure, Settings, ratio_figure


def _mb(kb: list[int]) -> list[float]:
    return [x / 1024 for x in kb]


def figures(s: Settings, session: dict) -> list[Figure]:
    train = train_overhead.collect(s, session)
    resume = resume_latency.collect(s, session, cold=False)
    save_it = [max(w.hwm_kb for w in r.windows if w.hwm_kb) for r in train["itertrain"]]
    save_hf = [max(w.hwm_kb for w in r.windows if w.hwm_kb) for r in train["hf"]]
    res_it = [r.mark_hwm_kb["step1"] for r in resume["itertrain"]]
    res_hf = [r.mark_hwm_kb["step1"] for r in resume["hf"]]
    loop_it = [r.mark_hwm_kb["loop_start"] for r in resume["itertrain"]]
    loop_hf = [r.mark_hwm_kb["loop_start"] for r in resume["hf"]]
    return [
        ratio_figure("peak RSS during checkpoint save", _mb(save_it), _mb(save_hf), target="<= 1.05x", unit="MB",
                     limit=1.05),
        ratio_figure("peak RSS during resume (launch -> first step done)", _mb(res_it), _mb(res_hf),
                     target="<= 1.05x", unit="MB", limit=1.05),
        ratio_figure("peak RSS, launch -> training loop starts (info)", _mb(loop_it), _mb(loop_hf), target="(info)",
                     unit="MB"),
        ratio_figure("peak RSS of the whole training job (info)", _mb([r.maxrss_kb for r in train["itertrain"]]),
                     _mb([r.maxrss_kb for r in train["hf"]]), target="(info)", unit="MB"),
    ]
