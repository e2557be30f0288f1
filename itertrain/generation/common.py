"""What both generation backends share: per-sample seeds, the global batches and how ranks deal them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TypeVar

from itertrain import distributed

T = TypeVar("T")


def example_seed(*parts: int | str) -> int:
    """A 63-bit seed from the parts (stable across processes and Python versions)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class Request:
    example: int
    sample: int
    prompt: str


def global_batches(prompts: list[str], samples_per_prompt: int, batch_size: int) -> list[list[Request]]:
    """Every (example, sample) request in batches of `batch_size`, sorted by prompt length so batches pad
    little. The order is global, so the batches do not depend on the number of ranks."""
    requests = [Request(i, s, p) for i, p in enumerate(prompts) for s in range(samples_per_prompt)]
    requests.sort(key=lambda r: (len(r.prompt), r.example, r.sample))
    return [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]


def deal(batches: list[T]) -> list[T]:
    """This rank's share of batches formed over the whole work, dealt round-robin: which batches
    exist does not depend on the number of ranks."""
    return batches[distributed.rank()::distributed.world_size()]
