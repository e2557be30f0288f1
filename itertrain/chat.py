"""Conversational rows (lists of {"role", "content"} messages), rendered with the tokenizer's chat template
exactly as TRL renders them.

The shapes are TRL's: `messages` (language modeling), `prompt` (prompt only), `prompt` + `completion`,
`prompt` + `chosen` + `rejected`, and `chosen` + `rejected` with the prompt implicit in both. Where TRL
is installed its own `trl.data_utils` functions render them (`apply_chat_template`, `is_conversational`,
`maybe_extract_prompt`); without TRL (it comes with the `dpo` extra only) the functions below do the same
for these shapes, and a unit test compares the two.
"""

from __future__ import annotations

from itertools import takewhile
from typing import Any

from itertrain.errors import UsageError

CONVERSATIONAL_KEYS = ("prompt", "chosen", "rejected", "completion", "messages")


def _trl() -> Any:
    try:
        from trl import data_utils
    except ImportError:
        return None
    return data_utils


def is_conversational(row: dict[str, Any]) -> bool:
    """Whether a row holds message lists (TRL's `is_conversational`: the first of its known keys decides)."""
    trl = _trl()
    if trl is not None:
        return bool(trl.is_conversational(row))
    keys = [k for k in row if k in CONVERSATIONAL_KEYS]
    value = row[keys[0]] if keys else None
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def check_template(tokenizer: Any, source: str) -> None:
    """A conversational row needs a chat template: exit 2 naming the source and what to do."""
    if getattr(tokenizer, "chat_template", None):
        return
    where = getattr(tokenizer, "name_or_path", "") or "the model"
    raise UsageError(
        f"{source} holds conversational rows (lists of role/content messages), but the tokenizer of {where} has "
        "no chat template to render them with. Use a model (or --tokenizer_name) whose tokenizer has one, or give "
        "plain rows (prompt/completion strings, or text)")


def check_rows(rows: list[dict[str, Any]], tokenizer: Any, source: str) -> None:
    """Before anything is written: conversational rows meet a tokenizer with a chat template, and each renders
    with it (once, as training renders it); UsageError naming the source, the row and the tokenizer."""
    conversational = [(n, r) for n, r in enumerate(rows) if isinstance(r, dict) and is_conversational(r)]
    if not conversational:
        return
    check_template(tokenizer, source)
    for n, row in conversational:
        try:
            render(explicit_prompt(row), tokenizer)
        except UsageError as e:
            where = getattr(tokenizer, "name_or_path", "") or "the model"
            raise UsageError(f"{source}: row {n} cannot be rendered with the chat template of {where}'s tokenizer: "
                             f"{e.__cause__ or e}. Fix the row (each message a role and a string content) or use "
                             "a model (or --tokenizer_name) whose template renders it") from e


def render(row: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """A conversational row as strings (TRL's `maybe_apply_chat_template`: `messages` becomes `text`; a prompt
    gets the generation prompt); any other row as it is."""
    if not is_conversational(row):
        return row
    check_template(tokenizer, "a training row")
    trl = _trl()
    keys = {k: row[k] for k in (*CONVERSATIONAL_KEYS, "chat_template_kwargs") if k in row}
    try:
        out = trl.apply_chat_template(keys, tokenizer) if trl is not None else _apply(keys, tokenizer)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's rows or template (KeyError, ValueError, jinja2 errors)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UsageError(f"a conversational row with keys {sorted(keys)} cannot be rendered with the chat template: "
                         f"{first}") from e
    return {**{k: v for k, v in row.items() if k not in keys}, **out}


def render_prompt(prompt: Any, tokenizer: Any) -> str:
    """A prompt to sample from, as text: a message list rendered with the generation prompt, a string as it is."""
    if isinstance(prompt, str):
        return prompt
    return render({"prompt": prompt}, tokenizer)["prompt"]


def as_completion(prompt: Any, text: str) -> Any:
    """A sampled completion in the shape of its prompt: an assistant message list for a conversational prompt."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def completion_text(completion: Any) -> str:
    """The text of a completion: the string, or the content of its messages."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def explicit_prompt(row: dict[str, Any]) -> dict[str, Any]:
    """A preference row with its prompt explicit (TRL's `maybe_extract_prompt`: the messages `chosen` and
    `rejected` share before they differ)."""
    if "chosen" not in row or "rejected" not in row or ("prompt" in row and not is_conversational(
            {"chosen": row["chosen"]})):
        return row
    trl = _trl()
    if trl is not None:
        return {**row, **trl.maybe_extract_prompt(row)}
    if "prompt" in row and is_conversational({"prompt": row["prompt"]}):
        return row
    chosen, rejected = row["chosen"], row["rejected"]
    n = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    return {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def message_segments(messages: list[dict[str, Any]], tokenizer: Any) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces: the assistant turns are trained (each as TRL
    renders a prompt + completion pair of the messages before it and that turn), the rest is not."""
    check_template(tokenizer, "a messages row")
    text = render({"messages": messages}, tokenizer)["text"]
    pieces: list[tuple[str, bool]] = []
    at = 0
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if i == 0:
            prompt, completion = "", render({"messages": [message]}, tokenizer)["text"]
        else:
            pair = render({"prompt": messages[:i], "completion": [message]}, tokenizer)
            prompt, completion = pair["prompt"], pair["completion"]
        if not text.startswith(prompt + completion, 0) or len(prompt) < at:
            raise UsageError("the chat template renders a conversation differently from its parts, so the assistant "
                             "turns cannot be found in it; give prompt/completion rows (message lists) instead")
        pieces += [(text[at:len(prompt)], False), (completion, True)]
        at = len(prompt) + len(completion)
    pieces.append((text[at:], False))
    return [(t, trained) for t, trained in pieces if t]


def _template(tokenizer: Any, messages: list[dict[str, Any]], row: dict[str, Any], **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **row.get("chat_template_kwargs", {}), **kwargs)


def _common_prefix(a: str, b: str) -> str:
    return "".join(x for x, _ in takewhile(lambda t: t[0] == t[1], zip(a, b)))


def _apply(row: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """TRL's `apply_chat_template` for the shapes above, for an environment without TRL."""
    out: dict[str, Any] = {}
    if "messages" in row:
        out["text"] = _template(tokenizer, row["messages"], row)
    if "prompt" in row:
        last = row["prompt"][-1]["role"]
        if last not in ("user", "tool", "assistant"):
            raise UsageError(f"a prompt's last message has the role {last!r}: expected user, tool or assistant")
        prompt = _template(tokenizer, row["prompt"], row, continue_final_message=last == "assistant",
                           add_generation_prompt=last != "assistant")
        for key in ("chosen", "rejected", "completion"):
            if key in row:
                full = _template(tokenizer, row["prompt"] + row[key], row)
                prompt = _common_prefix(prompt, full)
                out[key] = full
        for key in ("chosen", "rejected", "completion"):
            if key in out:
                out[key] = out[key][len(prompt):]
        out["prompt"] = prompt
    else:
        for key in ("chosen", "rejected"):
            if key in row:
                out[key] = _template(tokenizer, row[key], row)
    return out
