"""`itertrain status DIR` (inventory + plan, a dry run) and `itertrain verify DIR` (deep verification)."""

from __future__ import annotations

import dataclasses
import json
from argparse import ArgumentParser
from pathlib import Path

from itertrain.errors import ItertrainError, UsageError
from itertrain.experiment import load_record
from itertrain.recovery.discover import Status, discover, missing_aux
from itertrain.recovery.manifest import ManifestError, read_manifest
from itertrain.recovery.plan import RecoveryFlags, decide
from itertrain.recovery.report import inventory_to_json, plan_to_json, render
from itertrain.recovery.resolve import verify_chosen, with_missing_aux
from itertrain.recovery.verify import deep_problems


def _parser(prog: str, with_flags: bool) -> ArgumentParser:
    class P(ArgumentParser):
        def error(self, message):
            raise UsageError(f"{message} (usage: {self.format_usage().strip()})")

    p = P(prog=f"itertrain {prog}")
    p.add_argument("output_dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    if with_flags:
        p.add_argument("--resume_from", default="auto")
        p.add_argument("--resume_from_iteration", default="auto")
        p.add_argument("--num_iterations", type=int, default=None)
        p.add_argument("--iteration_init", default=None, choices=["previous", "base"])
    return p


def _existing_dir(path: str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory")
    return root


def status(argv: list[str]) -> int:
    """Inventory and the plan the given flags would produce (default auto/auto). Writes nothing."""
    ns = _parser("status", True).parse_args(argv)
    root = _existing_dir(ns.output_dir)
    record = load_record(root)
    args = record.get("arguments", {})
    flags = RecoveryFlags(
        ns.resume_from, ns.resume_from_iteration, False,
        ns.num_iterations or int(args.get("num_iterations", 1 << 30)),
        ns.iteration_init or args.get("iteration_init", "previous"),
    )
    inv = discover(root, record)
    inv = dataclasses.replace(inv, iteration_models=tuple(missing_aux(root, m) for m in inv.iteration_models))
    rejected: dict[str, str] = {}
    try:
        while True:
            plan = with_missing_aux(root, decide(flags, inv, rejected))
            failures = verify_chosen(root, inv, plan)
            if not failures:
                break
            rejected.update(failures)
        error = None
    except ItertrainError as e:
        plan, error = None, e
    if ns.json:
        print(json.dumps({"inventory": inventory_to_json(inv), "plan": plan_to_json(plan) if plan else None,
                          "error": str(error) if error else None}, indent=2))
    else:
        print(f"{root}: {'itertrain experiment' if inv.is_experiment else 'no itertrain.json (artifacts from other tools)'}")
        for m in inv.iteration_models:
            extra = f" — {m.problem}" if m.problem else ""
            aux = f" (missing {', '.join(m.missing_aux)}: recreated from the base model on resume)" if m.missing_aux else ""
            print(f"  🎯 {m.path:<24} iteration {m.iteration:<4} {m.status.value}{aux}{extra}")
        for c in inv.checkpoints:
            extra = f" — {c.problem}" if c.problem else ""
            print(f"  📁 {c.path:<24} iteration {c.iteration:<4} step {c.step:<7} {c.status.value}{extra}")
        for d in inv.data:
            print(f"  📦 {d.path:<24} iteration {d.iteration:<4} {d.status.value}")
        if plan is not None:
            print(render(plan, str(root), args.get("model_name", "--model_name")))
        else:
            print(f"plan: refused — {error}")
    return error.exit_code if error else 0


def verify(argv: list[str]) -> int:
    """Deep-verify every artifact; exit 1 when any is corrupt, torn or fails its checks."""
    ns = _parser("verify", False).parse_args(argv)
    root = _existing_dir(ns.output_dir)
    inv = discover(root, load_record(root))
    results = []
    bad = 0
    for artifact, kind in (
        *((m, "iteration_model") for m in inv.iteration_models),
        *((c, "trainer_checkpoint") for c in inv.checkpoints),
        *((d, "data") for d in inv.data),
    ):
        problems: list[str] = []
        if artifact.status in (Status.TORN, Status.CORRUPT, Status.INVALID):
            problems = [artifact.problem or artifact.status.value]
        else:
            try:
                manifest = None if getattr(artifact, "foreign", False) else read_manifest(root / artifact.path)
                problems = deep_problems(root / artifact.path, manifest, kind)
            except ManifestError as e:
                problems = [str(e)]
        ok = not problems
        bad += not ok
        results.append({"path": artifact.path, "kind": kind, "status": artifact.status.value, "ok": ok,
                        "problems": problems})
    if ns.json:
        print(json.dumps({"output_dir": str(root), "ok": bad == 0, "artifacts": results}, indent=2))
    else:
        for r in results:
            mark = "✅" if r["ok"] else "❌"
            print(f"{mark} {r['path']:<28} {r['status']:<11}" + (" " + "; ".join(r["problems"]) if r["problems"] else ""))
        print(f"{len(results) - bad} of {len(results)} artifacts verified" + (f", {bad} failed" if bad else ""))
    return 1 if bad else 0
