"""The one registry of strategies: it drives `--strategy` (help text and validation), the
experiment-defining fields of itertrain.json, and `itertrain strategies`.

A strategy is found, in this order: registered in this process (`register_strategy`), built in,
installed under the entry-point group `itertrain.strategies`, or named `package.module:ClassName`
(imported with the current directory on the import path, as `python -m` does).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from typing import Callable, TypeVar, overload

from itertrain.errors import UsageError
from itertrain.strategies.base import Strategy

ENTRY_POINT_GROUP = "itertrain.strategies"
BUILTIN = {
    "sft": "itertrain.strategies.sft:SFTStrategy",
    "expert_iteration": "itertrain.strategies.expert_iteration:ExpertIterationStrategy",
    "iterative_dpo": "itertrain.strategies.iterative_dpo:IterativeDPOStrategy",
    "grpo": "itertrain.strategies.grpo:GRPOStrategy",
    "rloo": "itertrain.strategies.grpo:RLOOStrategy",
}
_registered: dict[str, type[Strategy]] = {}

S = TypeVar("S", bound=type[Strategy])


@overload
def register_strategy(name_or_class: S) -> S: ...
@overload
def register_strategy(name_or_class: str, strategy: None = None) -> Callable[[S], S]: ...
@overload
def register_strategy(name_or_class: str, strategy: S) -> S: ...


def register_strategy(name_or_class, strategy=None, *, replace: bool = False):
    """Register a Strategy subclass under a name: `register_strategy(MyStrategy)` (its `name`, else
    the class name), `register_strategy("mine", MyStrategy)`, or `@register_strategy("mine")`.

    A name that is taken (built in, an entry point, or registered by another class) is refused with a
    UsageError naming what has it, unless `replace=True` says the replacement is meant."""
    if isinstance(name_or_class, str):
        if strategy is None:
            return lambda cls: register_strategy(name_or_class, cls, replace=replace)
        name, cls = name_or_class, strategy
    else:
        cls = name_or_class
        name = getattr(cls, "name", "") or cls.__name__
    _check_class(cls, name)
    taken = None if replace else _taken_by(name, cls)
    if taken is not None:
        raise UsageError(f"register_strategy: the name {name!r} is taken ({taken}); choose another name, or "
                         f"pass replace=True to replace it")
    if not cls.__dict__.get("name"):
        cls.name = name
    _registered[name] = cls
    return cls


def _taken_by(name: str, cls: type) -> str | None:
    """What already has `name`, or None (free, or this same class registered again, as a module run
    twice does)."""
    old = _registered.get(name)
    if old is not None:
        same = (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
        return None if same else f"registered: {old.__module__}.{old.__qualname__}"
    if name in BUILTIN:
        return f"built in: {BUILTIN[name]}"
    ep = _entry_points().get(name)
    return f"entry point {ep.value}" if ep is not None else None


def _check_class(cls: object, spec: str) -> type[Strategy]:
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise UsageError(f"--strategy {spec}: {cls!r} is not a subclass of itertrain.Strategy")
    return cls


def _import(spec: str) -> type[Strategy]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--strategy {spec}: expected package.module:ClassName")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: a module beside the command line is found
    try:
        module = importlib.import_module(module_name)
    except UsageError:
        raise  # a module that explains itself (e.g. a missing optional dependency)
    except Exception as e:  # noqa: BLE001 - any import failure of user code is reported in one line
        raise UsageError(f"--strategy {spec}: cannot import {module_name} ({type(e).__name__}: {e})") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"--strategy {spec}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return _check_class(obj, spec)


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available() -> dict[str, str]:
    """Strategy name -> where it comes from, for help texts and `itertrain strategies`."""
    out = {name: "built in" for name in BUILTIN}
    out.update({name: f"entry point {ep.value}" for name, ep in _entry_points().items() if name not in out})
    out.update({name: f"registered ({cls.__module__}.{cls.__qualname__})" for name, cls in _registered.items()})
    return out


def load_strategy(spec: str) -> type[Strategy]:
    """The Strategy class `spec` names; UsageError (exit 2) when there is none."""
    if spec in _registered:
        return _registered[spec]
    if spec in BUILTIN:
        cls = _import(BUILTIN[spec])
    elif (ep := _entry_points().get(spec)) is not None:
        try:
            cls = _check_class(ep.load(), spec)
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"--strategy {spec}: the entry point {ep.value} cannot be loaded ({e})") from e
    elif ":" in spec:
        cls = _import(spec)
    else:
        raise UsageError(
            f"--strategy {spec!r}: invalid choice; choose from {', '.join(available())}, or name a class as "
            "package.module:ClassName"
        )
    if not cls.__dict__.get("name"):
        cls.name = spec
    return cls
