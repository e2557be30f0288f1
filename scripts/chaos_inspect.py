"""What scripts/chaos.py reads from an experiment directory between launches: the newest committed
progress, where the last launch resumed (its runs/recovery-*.json), and the damage it does on purpose."""

from __future__ import annotations

import json
from pathlib import Path


def committed_point(out: Path, damaged: frozenset[str] = frozenset()) -> tuple[int, int]:
    """Newest committed progress: (iteration, step) a correct resume must not fall behind. `damaged`:
    checkpoints the harness itself damaged, which a correct resume falls back past."""
    from itertrain.recovery.discover import Status, discover

    if not out.exists():
        return (0, 0)
    inv = discover(out)
    best = (0, 0)
    for m in inv.iteration_models:
        if m.status == Status.COMMITTED:
            best = max(best, (m.iteration + 1, 0))
    for c in inv.checkpoints:
        if c.status == Status.COMMITTED and c.path not in damaged:
            best = max(best, (c.iteration, c.step))
    return best


def resumed_at(out: Path, seen: set[str]) -> tuple[tuple[int, int] | None, list[str]]:
    """(iteration, step) the newest launch continued at, and the candidates its plan rejected."""
    runs = out / "runs"
    new = sorted(p for p in runs.glob("recovery-*.json") if p.name not in seen) if runs.exists() else []
    if not new:
        return None, []
    seen.update(p.name for p in new)
    plan = json.loads(new[-1].read_text())["plan"]
    return (plan["iteration"], plan["step"]), [f"{r['path']}: {r['reason']}" for r in plan["rejected"]]


def corrupt_newest_adapter(out: Path) -> str | None:
    """Flip a byte in the adapter file of the newest committed top-level checkpoint (a damaged disk)."""
    from itertrain.recovery.discover import Status, discover

    committed = [c for c in discover(out).checkpoints if c.status == Status.COMMITTED and "/" not in c.path]
    if not committed:
        return None
    newest = max(committed, key=lambda c: (c.iteration, c.step))
    path = out / newest.path / "adapter_model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    return newest.path
