"""LoRA iteration models with PEFT: the settings a run records, and their checks. Pure (no torch, no PEFT).

itertrain trains a LoRA adapter instead of all weights under `--use_peft` (TRL's flag names and
meanings). What an adapter applies to, and where its weights come from, is decided by the recovery
plan (`RecoveryPlan.adapter_base`, `RecoveryPlan.adapter_from`); PEFT itself is used in
`itertrain.lora.model` (building, loading, merging, saving) and `itertrain.lora.links` (the
fingerprinted reference from an adapter to the model it applies to).

Two iteration-model modes (`--iteration_model`):
- `merged`: iter_K is a full model with the adapter merged in; iteration K+1 trains a fresh adapter
  on it, so optimizer moments never cross an iteration boundary.
- `adapter`: iter_K holds the adapter only. One adapter continues across iterations on the base
  model (never stacked), so iter_K = base + its adapter, and moments may carry.
"""

from __future__ import annotations

import re
from typing import Any

from itertrain.errors import UsageError

MIN_PEFT = "0.21.2"  # the lowest version itertrain is tested with
INSTALL = "pip install 'itertrain[lora]'"
ALL_LINEAR = "all-linear"
MERGED, ADAPTER = "merged", "adapter"
_REGEX_CHARS = re.compile(r"[.*+?\[\](){}|^$\\]")
# The settings recorded in itertrain.json and in every LoRA artifact's manifest (TRL's names).
SETTINGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "iteration_model")


def settings_of(lora_args: Any) -> dict[str, Any]:
    """The LoRA settings of a run (JSON-safe), from its LoraArguments."""
    out = {name: getattr(lora_args, name) for name in SETTINGS}
    out["lora_target_modules"] = list(out["lora_target_modules"])
    return out


def peft_target_modules(values: list[str] | tuple[str, ...] | str) -> str | list[str]:
    """The value PEFT's LoraConfig gets for `--lora_target_modules`.

    `all-linear` and a single regular expression stay a string (PEFT matches a string against the full
    module path); names stay a list (PEFT matches a name against the end of each module path). TRL
    collapses any one-item list into a string, which turns `--lora_target_modules q_proj` into a regex
    that matches nothing; itertrain keeps names as names."""
    values = [values] if isinstance(values, str) else list(values)
    if len(values) == 1 and (values[0].lower() == ALL_LINEAR or _REGEX_CHARS.search(values[0])):
        return ALL_LINEAR if values[0].lower() == ALL_LINEAR else values[0]
    return values


def check_settings(lora_args: Any) -> None:
    """Flag values PEFT would refuse late (or accept with a different meaning); raise UsageError (exit 2)."""
    if not lora_args.use_peft:
        if lora_args.iteration_model != MERGED:
            raise UsageError(f"--iteration_model {lora_args.iteration_model} describes LoRA iteration models: add "
                             "--use_peft, or leave --iteration_model out")
        return
    if lora_args.lora_r < 1:
        raise UsageError(f"--lora_r {lora_args.lora_r}: the LoRA rank must be at least 1")
    if not 0.0 <= lora_args.lora_dropout < 1.0:
        raise UsageError(f"--lora_dropout {lora_args.lora_dropout}: must be in [0, 1)")
    targets = list(lora_args.lora_target_modules or [])
    if not targets:
        raise UsageError("--lora_target_modules: name at least one module, or all-linear")
    if len(targets) > 1 and any(t.lower() == ALL_LINEAR or _REGEX_CHARS.search(t) for t in targets):
        raise UsageError(f"--lora_target_modules {' '.join(targets)}: all-linear or a regular expression must be "
                         "the only value (or list plain module names such as q_proj v_proj)")
    require_peft()


def require_peft() -> None:
    """PEFT is an optional dependency: a clear usage error (exit 2) when it is missing or too old."""
    try:
        import peft
    except ImportError as e:
        raise UsageError(f"--use_peft trains LoRA adapters with PEFT, an optional dependency that is not installed: "
                         f"{INSTALL}") from e
    from packaging.version import Version

    if Version(peft.__version__) < Version(MIN_PEFT):
        raise UsageError(f"--use_peft needs peft>={MIN_PEFT}, found {peft.__version__}: pip install -U "
                         "'itertrain[lora]'")
