"""Built-in tasks: data and held-out metrics that need nothing from the network."""

from __future__ import annotations


def get_task(name: str, seed: int):
    if name == "arithmetic":
        from itertrain.tasks.arithmetic import ArithmeticTask

        return ArithmeticTask(seed=seed)
    raise ValueError(f"unknown task {name!r}")
