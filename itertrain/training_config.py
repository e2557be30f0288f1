"""A strategy's TrainingArguments subclass (TRL's configs, say) on the command line: the fields it adds to
TrainingArguments as a flag group of their own, and the subclass built from the parsed values, keeping the
subclass's own defaults where the user gave no value.
"""

from __future__ import annotations

from dataclasses import MISSING, field, fields, make_dataclass
from typing import Any

from itertrain.errors import UsageError


def added_fields(subclass: type, taken: set[str]) -> type | None:
    """A dataclass of the fields a TrainingArguments subclass (e.g. trl.DPOConfig) adds to
    TrainingArguments, under their own names, less those an itertrain group already has (one flag,
    one meaning). HF's flags are parsed as TrainingArguments and the subclass is built from both."""
    import typing

    from transformers import TrainingArguments

    if subclass is TrainingArguments:
        return None
    base = {f.name for f in fields(TrainingArguments)}
    hints = typing.get_type_hints(subclass)
    specs = []
    for f in fields(subclass):
        if not f.init or f.name in base or f.name in taken:
            continue
        kw: dict[str, Any] = {"metadata": f.metadata}
        if f.default is not MISSING:
            kw["default"] = f.default
        elif f.default_factory is not MISSING:
            kw["default_factory"] = f.default_factory
        specs.append((f.name, hints.get(f.name, Any), field(**kw)))
    if not specs:
        return None
    group = make_dataclass(f"{subclass.__name__}Fields", specs)
    group._argument_group_name = f"{subclass.__module__}.{subclass.__qualname__} (fields it adds to TrainingArguments)"
    return group


# Off unless asked for, whatever a TrainingArguments subclass defaults to (TRL's configs turn both on):
# itertrain's runs are fp32 and byte-reproducible on a CPU by default.
KEPT_OFF = ("bf16", "gradient_checkpointing")


def build_training_arguments(subclass: type, training: Any, added: Any, given: set[str] = frozenset(),
                             shared: dict[str, Any] | None = None) -> Any:
    """The strategy's TrainingArguments subclass from the parsed TrainingArguments and its own fields.
    A field the subclass defaults differently (GRPOConfig's remove_unused_columns=False, say) keeps the
    subclass's default unless `given` names it (a flag, a YAML key, or the strategy's training_defaults);
    `shared`: the subclass's fields that take an itertrain flag's value (`Strategy.training_from`)."""
    from transformers import TrainingArguments

    if subclass is TrainingArguments:
        return training
    ours = {f.name: f for f in fields(subclass)}
    values = {f.name: getattr(training, f.name) for f in fields(TrainingArguments) if f.init
              if f.name in given or f.name in KEPT_OFF or _same_default(f, ours.get(f.name))}
    values.update({f.name: getattr(added, f.name) for f in fields(added)} if added is not None else {})
    values.update({k: v for k, v in (shared or {}).items() if k in {f.name for f in fields(subclass) if f.init}})
    try:
        return subclass(**values)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{subclass.__name__}: {str(e).strip().splitlines()[0]}") from e


def _same_default(base: Any, sub: Any) -> bool:
    """Whether a TrainingArguments field has the same default in a subclass (or the subclass lacks it)."""
    if sub is None:
        return True
    def default(f: Any) -> Any:
        return f.default if f.default is not MISSING else \
            f.default_factory() if f.default_factory is not MISSING else MISSING

    return default(base) == default(sub)
