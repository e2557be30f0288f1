"""`itertrain status DIR` (inventory + plan, a dry run) and `itertrain verify DIR` (deep verification).

Both only read. While a run holds the directory they name it (pid, host, start time) and show a
checkpoint without a manifest as being written, not torn.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from itertrain import data_lineage
from itertrain.artifacts.manifest import ManifestError
from itertrain.errors import ItertrainError, UsageError
from itertrain.experiment import load_record
from itertrain.layout import SUPERSEDED_DIR, experiment_dir
from itertrain.lock import describe_holder, live_holder
from itertrain.lora.links import base_model_problems, check_links
from itertrain.metrics import committed_metrics
from itertrain.recovery import kinds
from itertrain.recovery.decide import decide
from itertrain.recovery.discover import Inventory, Status, discover, missing_aux
from itertrain.recovery.flags import RecoveryFlags
from itertrain.recovery.report import inventory_to_json, plan_to_json, render
from itertrain.recovery.resolve import verify_chosen, with_missing_aux

STATUS_SCHEMA = 2
IN_FLIGHT = "being written"


def _parser(prog: str, with_flags: bool) -> ArgumentParser:
    class P(ArgumentParser):
        def error(self, message):
            raise UsageError(f"{message} (usage: {self.format_usage().strip()})")

    p = P(prog=f"itertrain {prog}", allow_abbrev=False,
          description="What exists in an experiment directory and the recovery plan a launch would take "
                      "(writes nothing)." if with_flags else
          "Deep-verify every artifact of an experiment directory (checksums; writes nothing).")
    p.add_argument("output_dir", help="the experiment's --output_dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    if with_flags:
        p.add_argument("--resume_from", default="auto", help="as for train: auto | none | S (default auto)")
        p.add_argument("--resume_from_iteration", default="auto", help="as for train: auto | none | iter_K (default auto)")
        p.add_argument("--num_iterations", type=int, default=None,
                       help="target number of iterations (default: the experiment's own)")
        p.add_argument("--iteration_init", default=None, choices=["previous", "base"],
                       help="as for train (default: the experiment's own)")
    return p


def _existing_dir(path: str) -> Path:
    root = experiment_dir(path)
    if root != Path(path):
        print(f"({path} is a demo directory: showing its experiment, {root})", file=sys.stderr)
    return root


def _in_flight(inv: Inventory, holder: dict | None) -> set[str]:
    """Manifest-less directories while a run is alive: saves in progress (torn ones were removed when
    that run started)."""
    return set(inv.torn) if holder is not None else set()


def status(argv: list[str]) -> int:
    """Inventory and the plan the given flags would produce (default auto/auto). Writes nothing."""
    ns = _parser("status", True).parse_args(argv)
    root = _existing_dir(ns.output_dir)
    record = load_record(root)
    args = record.get("arguments", {})
    target = ns.num_iterations or int(args.get("num_iterations", 1 << 30))
    flags = RecoveryFlags(ns.resume_from, ns.resume_from_iteration, False, target,
                          ns.iteration_init or args.get("iteration_init", "previous"),
                          args.get("iteration_model", "merged") if args.get("use_peft") else None)
    holder = live_holder(root)
    inv = discover(root, record)
    inv = dataclasses.replace(inv, iteration_models=tuple(missing_aux(root, m) for m in inv.iteration_models))
    flying = _in_flight(inv, holder)
    rejected: dict[str, str] = {}
    try:
        while True:
            plan = with_missing_aux(root, decide(flags, inv, rejected))
            # and, as a launch does, every LoRA adapter against the model it applies to (a changed base refuses)
            failures = verify_chosen(root, inv, plan) or check_links(root, plan, str(args.get("model_name", "")))
            if not failures:
                break
            rejected.update(failures)
        error = None
    except ItertrainError as e:
        plan, error = None, e
    data = data_lineage.status_of(root, args, plan)
    unusable = base_model_problems(root, [m.path for m in inv.iteration_models])
    aside = superseded(root)
    code = error.exit_code if error else 1 if unusable else 0
    if ns.json:
        out = _status_json(root, record, inv, plan, error, holder, flying, target)
        print(json.dumps({**out, "training_data": data, "base_model_problems": unusable, "superseded": aside},
                         indent=2))
        return code
    print(f"{root}: {'itertrain experiment' if inv.is_experiment else 'no itertrain.json (artifacts from other tools)'}"
          + (f", {record['arguments'].get('num_iterations')} iterations planned" if record.get("arguments") else ""))
    if holder is not None:
        print(f"  🔒 a run is alive here: {describe_holder(holder)}; the plan below is what a relaunch would do "
              "after it stops")
    for kind in kinds.registered():
        for a in inv.group(kind.group):
            print(kind.describe(a, _label(a, flying), a.path in flying))
    for a in aside:
        print(f"  🗄️  {a['path'] + '/':<24} moved aside: {', '.join(a['artifacts']) or 'empty'} (never used by "
              "recovery; kept for you to inspect or delete)")
    for rel, problem in unusable.items():
        print(f"  ❌ {rel}: {problem}")
    if plan is not None:
        print(render(plan, str(root), args.get("model_name", "--model_name_or_path")))
        if data is not None:
            print(data_lineage.status_line(data))
    else:
        print(f"plan: refused — {error}")
    if unusable and plan is not None:
        print(f"⚠️  {len(unusable)} iteration model(s) cannot be loaded as trained (above): the plan holds only once "
              "their base model is back")
    return code


def _label(artifact: Any, flying: set[str]) -> str:
    label = IN_FLIGHT if artifact.path in flying else artifact.status.value
    return label + (" (symlink)" if getattr(artifact, "symlink", False) else "")


def _status_json(root: Path, record: dict, inv: Inventory, plan, error, holder: dict | None, flying: set[str],
                 target: int) -> dict[str, Any]:
    absolute = os.path.abspath(root)
    inventory = inventory_to_json(inv)
    for kind in kinds.registered():
        for a in inventory[kind.group]:
            a["absolute_path"] = os.path.join(absolute, a["path"])
            if a["path"] in flying:
                a["status"] = "in_flight"
    return {
        "schema": STATUS_SCHEMA,
        "output_dir": absolute,
        "is_experiment": inv.is_experiment,
        "experiment_id": record.get("experiment_id"),
        "created": record.get("created"),
        "num_iterations": record.get("arguments", {}).get("num_iterations"),
        "target_num_iterations": target if target != 1 << 30 else None,
        "live_run": holder,
        "inventory": inventory,
        "iterations": committed_metrics(root),
        "plan": plan_to_json(plan) if plan else None,
        "error": str(error) if error else None,
    }


def verify(argv: list[str]) -> int:
    """Deep-verify every artifact; exit 1 when any committed one is corrupt or fails its checks. A torn,
    never-committed leftover (which recovery skips) and a save in progress under a live run are shown, not
    counted."""
    ns = _parser("verify", False).parse_args(argv)
    root = _existing_dir(ns.output_dir)
    holder = live_holder(root)
    inv = discover(root, load_record(root))
    flying = _in_flight(inv, holder)
    results = []
    bad = 0
    for kind, artifact in ((k, a) for k in kinds.registered() for a in inv.group(k.group)):
        results.append(_verified(root, kind, artifact, flying))
        bad += results[-1]["ok"] is False
    checked = [r for r in results if r["ok"] is not None]
    leftovers = sum(bool(r.get("leftover")) for r in results)
    if ns.json:
        print(json.dumps({"output_dir": os.path.abspath(root), "ok": bad == 0, "live_run": holder,
                          "artifacts": results}, indent=2))
    else:
        if holder is not None:
            print(f"🔒 a run is alive here: {describe_holder(holder)}")
        for r in results:
            mark = "🧹" if r.get("leftover") else "⏳" if r["ok"] is None else "✅" if r["ok"] else "❌"
            status_text = r["status"] if r.get("leftover") else IN_FLIGHT if r["ok"] is None else r["status"]
            print(f"{mark} {r['path']:<28} {status_text:<13}" + (" " + "; ".join(r["problems"]) if r["problems"] else ""))
        print(f"{len(checked) - bad} of {len(checked)} artifacts verified" + (f", {bad} failed" if bad else "")
              + (f", {len(results) - len(checked) - leftovers} being written"
                 if len(checked) + leftovers < len(results) else "")
              + (f", {leftovers} torn leftover(s) of a save that never completed (not a failure: the next "
                 "launch removes them)" if leftovers else ""))
    return 1 if bad else 0


def _verified(root: Path, kind: kinds.ArtifactKind, artifact: Any, flying: set[str]) -> dict[str, Any]:
    """One artifact's line of `itertrain verify`, by its kind's deep check."""
    if artifact.path in flying:
        return {"path": artifact.path, "kind": kind.name, "status": "in_flight", "ok": None, "problems": []}
    if artifact.status == Status.TORN:  # never committed: recovery never uses it, the next launch removes it
        return {"path": artifact.path, "kind": kind.name, "status": "torn", "ok": None, "leftover": True,
                "problems": [f"{artifact.problem or 'no manifest'}: a save that never completed; "
                             "never used, the next launch removes it"]}
    if artifact.status in (Status.CORRUPT, Status.INVALID):
        problems = [artifact.problem or artifact.status.value]
    else:
        try:
            problems = kind.verify(root, artifact)
        except ManifestError as e:
            problems = [str(e)]
        problems += kind.link_problems(root, artifact)
    return {"path": artifact.path, "kind": kind.name, "status": artifact.status.value, "ok": not problems,
            "problems": problems, "symlink": getattr(artifact, "symlink", False)}


def superseded(root: Path) -> list[dict[str, Any]]:
    """What was moved aside into superseded/<time>/ (by --overwrite_output_dir or a rebuild), oldest first."""
    base = root / SUPERSEDED_DIR
    if not base.is_dir() or base.is_symlink():
        return []
    return [{"path": f"{SUPERSEDED_DIR}/{d.name}", "artifacts": sorted(p.name for p in d.iterdir())}
            for d in sorted(base.iterdir()) if d.is_dir() and not d.is_symlink()]
