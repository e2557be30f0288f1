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


ROLES = ("system", "user", "assistant", "tool")  # the roles of TRL's conversational rows
ROW_SHAPES: tuple[tuple[str, ...], ...] = (("prompt", "completion"), ("text",), ("messages",))  # what SFT trains on


def check_rows(rows: list[dict[str, Any]], source: str, shapes: tuple[tuple[str, ...], ...] = ROW_SHAPES) -> None:
    """Training rows must exist and each have the keys of one of `shapes` (default: prompt+completion, text or
    messages), checked before anything is written; prompt, completion and messages may be message lists
    (rendered with the chat template)."""
    if not rows:
        raise UsageError(f"{source}: no training examples")
    for n, row in enumerate(rows):
        if not any(all(k in row for k in shape) for shape in shapes):
            raise UsageError(f"{source}: row {n} needs {describe_shapes(shapes)}, got keys {sorted(row)}")
        if "messages" in row and not _messages(row["messages"]):
            raise UsageError(f"{source}: row {n}: messages must be a list of {{\"role\", \"content\"}} objects")
        if "messages" in row and "text" not in row and not any(m["role"] == "assistant" for m in row["messages"]):
            unknown = sorted({str(m["role"]) for m in row["messages"]} - set(ROLES))
            raise UsageError(f"{source}: row {n} has no assistant message"
                             + (f" (the role {', '.join(map(repr, unknown))} is none of {', '.join(ROLES)})"
                                if unknown else "")
                             + ": a messages row is trained on its assistant turns only, so it would train on nothing")


def describe_shapes(shapes: tuple[tuple[str, ...], ...]) -> str:
    """`prompt+completion, text, or messages`: the row shapes as a message names them."""
    names = ["+".join(shape) for shape in shapes]
    if len(names) < 3:
        return " or ".join(names)
    return ", ".join(names[:-1]) + ", or " + names[-1]


def _messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _bos(tokenizer, text: str) -> list[int]:
    """BOS in front, unless the text starts with it already (a chat template that writes it)."""
    if tokenizer.bos_token_id is None or (tokenizer.bos_token and text.startswith(tokenizer.bos_token)):
        return []
    return [tokenizer.bos_token_id]


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A prompt's token ids as training and generation see it: BOS (when the tokenizer has one and the text
    does not start with it), then the text without the tokenizer's own special tokens (`StrategyContext.encode`)."""
    return _bos(tokenizer, str(text)) + tokenizer(str(text), add_special_tokens=False)["input_ids"]


def _messages_example(row: dict[str, Any], tokenizer, max_length: int) -> dict[str, list[int]]:
    """A `messages` row: the rendered conversation, loss on the assistant turns only (their end is the
    template's: no EOS is added, as TRL adds none to conversational rows)."""
    from itertrain.chat import message_segments

    pieces = message_segments(row["messages"], tokenizer)
    ids = _bos(tokenizer, pieces[0][0] if pieces else "")
    labels = [IGNORE_INDEX] * len(ids)
    for text, trained in pieces:
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if trained else [IGNORE_INDEX] * len(part)
    return {"input_ids": ids[:max_length], "attention_mask": [1] * len(ids[:max_length]),
            "labels": labels[:max_length]}


def tokenize_example(row: dict[str, Any], tokenizer, max_length: int) -> dict[str, list[int]]:
    """prompt/completion (loss on the completion only), messages (loss on the assistant turns only) or text
    (loss on everything); BOS added, and EOS after a plain completion or text. Message lists are rendered
    with the tokenizer's chat template as TRL renders them (`itertrain.chat`)."""
    from itertrain.chat import is_conversational, render

    if "messages" in row and not ("prompt" in row and "completion" in row):
        return _messages_example(row, tokenizer, max_length)
    conversational = is_conversational(row)
    row = render(row, tokenizer) if conversational else row
    # a conversational completion ends as the chat template ends an assistant turn: no EOS added (as TRL)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and not conversational else []
    if "prompt" in row and "completion" in row:
        prompt = prompt_ids(tokenizer, row["prompt"])
        completion = tokenizer(str(row["completion"]), add_special_tokens=False)["input_ids"] + eos
        ids = (prompt + completion)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]
    elif "text" in row:
        text = str(row["text"])
        ids = (_bos(tokenizer, text) + tokenizer(text, add_special_tokens=False)["input_ids"] + eos)[:max_length]
        labels = list(ids)
    else:
        raise UsageError(f"a training row needs {ROW_SHAPES}, got keys {sorted(row)}")
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def build_dataset(rows: list[dict[str, Any]], tokenizer, max_length: int, *, source: str = "training rows"):
    """A datasets.Dataset of tokenized examples (built in memory: no cache files, deterministic)."""
    from datasets import Dataset

    from itertrain import chat

    check_rows(rows, source)
    chat.check_rows(rows, tokenizer, source)
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
