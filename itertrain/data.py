"""Training data: JSONL reading, tokenization for causal-LM fine-tuning, and a padding collator."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from itertrain.errors import UsageError

IGNORE_INDEX = -100


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a bad line is a UsageError naming the file and line."""
    rows = []
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such data file")
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{p}, line {n}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise UsageError(f"{p}, line {n}: expected a JSON object")
            rows.append(row)
    return rows


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def resolve_path(template: str, iteration: int) -> str:
    return template.replace("{iteration}", str(iteration))


ROW_SHAPES: tuple[tuple[str, ...], ...] = (("prompt", "completion"), ("text",))  # what SFT trains on


def check_rows(rows: list[dict[str, Any]], source: str, shapes: tuple[tuple[str, ...], ...] = ROW_SHAPES) -> None:
    """Training rows must exist and each have the keys of one of `shapes` (default: prompt+completion or
    text), checked before anything is written."""
    if not rows:
        raise UsageError(f"{source}: no training examples")
    for n, row in enumerate(rows):
        if not any(all(k in row for k in shape) for shape in shapes):
            wanted = " or ".join("+".join(shape) for shape in shapes)
            raise UsageError(f"{source}: row {n} needs {wanted}, got keys {sorted(row)}")


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A prompt's token ids as training and generation see it: BOS (when the tokenizer has one), then the
    text without the tokenizer's own special tokens (`StrategyContext.encode`)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(str(text), add_special_tokens=False)["input_ids"]


def tokenize_example(row: dict[str, Any], tokenizer, max_length: int) -> dict[str, list[int]]:
    """prompt/completion (loss on the completion only) or text (loss on everything); BOS and EOS added."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "prompt" in row and "completion" in row:
        prompt = prompt_ids(tokenizer, row["prompt"])
        completion = tokenizer(str(row["completion"]), add_special_tokens=False)["input_ids"] + eos
        ids = (prompt + completion)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]
    elif "text" in row:
        ids = (bos + tokenizer(str(row["text"]), add_special_tokens=False)["input_ids"] + eos)[:max_length]
        labels = list(ids)
    else:
        raise UsageError(f"a training row needs prompt+completion or text, got keys {sorted(row)}")
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def build_dataset(rows: list[dict[str, Any]], tokenizer, max_length: int, *, source: str = "training rows"):
    """A datasets.Dataset of tokenized examples (built in memory: no cache files, deterministic)."""
    from datasets import Dataset

    check_rows(rows, source)
    return Dataset.from_list([tokenize_example(r, tokenizer, max_length) for r in rows])


@dataclass
class PadCollator:
    """Right-pads input_ids / attention_mask / labels of a batch to its longest example."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([f[key] + [value] * (width - len(f[key])) for f in features], dtype=torch.long)
        return {
            "input_ids": pad("input_ids", self.pad_token_id),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", IGNORE_INDEX),
        }
