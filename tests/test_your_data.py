"""Users' own data: conversational rows rendered as TRL renders them, for every strategy."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from conftest import FAST_FLAGS, itertrain
from itertrain import chat
from itertrain.data import IGNORE_INDEX, tokenize_example
from itertrain.tiny_model import build_tokenizer

USER = {"role": "user", "content": "2+3="}
SYSTEM = {"role": "system", "content": "Add."}
ROWS = [
    {"messages": [SYSTEM, USER, {"role": "assistant", "content": "5"}]},
    {"prompt": [USER]},
    {"prompt": [SYSTEM, USER], "completion": [{"role": "assistant", "content": "5"}]},
    {"prompt": [USER], "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "6"}]},
    {"chosen": [USER, {"role": "assistant", "content": "5"}], "rejected": [USER, {"role": "assistant", "content": "6"}]},
    {"prompt": [USER, {"role": "assistant", "content": "The sum is"}]},  # continued, not a new turn
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: "+".join(r))
def test_conversational_rows_render_exactly_as_trls_apply_chat_template(row, monkeypatch):
    pytest.importorskip("trl")  # the reference to compare with (the lowest-version venv has no [dpo])
    from trl.data_utils import apply_chat_template, maybe_extract_prompt

    tokenizer = build_tokenizer()
    trl_out = apply_chat_template(row, tokenizer)
    assert chat.render(row, tokenizer) == trl_out  # itertrain with TRL installed: TRL's own function
    monkeypatch.setattr(chat, "_trl", lambda: None)  # an environment without TRL: itertrain's equivalent
    assert chat.render(row, tokenizer) == trl_out
    assert chat.explicit_prompt(row) == {**row, **maybe_extract_prompt(row)}


def test_a_messages_row_is_trained_on_its_assistant_turns_only():
    tokenizer = build_tokenizer()
    row = {"messages": [SYSTEM, USER, {"role": "assistant", "content": "5"}, {"role": "user", "content": "1+1="},
                        {"role": "assistant", "content": "2"}]}
    ex = tokenize_example(row, tokenizer, 256)
    trained = tokenizer.decode([t for t in ex["labels"] if t != IGNORE_INDEX])
    assert trained == "5</s>2</s>"
    assert tokenizer.decode(ex["input_ids"]) == "<s>" + tokenizer.apply_chat_template(row["messages"], tokenize=False)
    # a prompt/completion pair of message lists: the loss on the completion, as TRL renders it
    pair = tokenize_example({"prompt": [USER], "completion": [{"role": "assistant", "content": "5"}]}, tokenizer, 256)
    assert tokenizer.decode([t for t in pair["labels"] if t != IGNORE_INDEX]) == "5</s>"
    from itertrain.data import check_rows
    from itertrain.errors import UsageError

    with pytest.raises(UsageError, match="row 0 has no assistant message"):  # it would train on nothing
        check_rows([{"messages": [USER]}], "chat.jsonl")


@pytest.mark.parametrize("row,expected", [
    ({"messages": [USER, {"role": "assistant"}]}, "has no attribute 'content'"),
    ({"prompt": [USER], "completion": [{"role": "assistant", "content": ["5"]}]}, "can only concatenate str"),
], ids=["assistant_without_content", "list_content"])
def test_a_row_the_chat_template_cannot_render_is_refused_naming_the_source_row_and_tokenizer(row, expected):
    from itertrain.errors import UsageError

    tokenizer = build_tokenizer()
    tokenizer.name_or_path = "tiny-model"
    good = {"messages": [USER, {"role": "assistant", "content": "5"}]}
    with pytest.raises(UsageError, match=r"^chat.jsonl: row 1 cannot be rendered with the chat template of "
                                         r"tiny-model's tokenizer: .*" + re.escape(expected)):
        chat.check_rows([good, row], tokenizer, "chat.jsonl")


def test_a_messages_row_with_an_unknown_role_and_no_assistant_names_the_role():
    from itertrain.data import check_rows
    from itertrain.errors import UsageError

    with pytest.raises(UsageError, match=r"row 0 has no assistant message \(the role 'wizard' is none of system, "
                                         r"user, assistant, tool\)"):
        check_rows([{"messages": [USER, {"role": "wizard", "content": "5"}]}], "chat.jsonl")


@pytest.mark.slow
def test_an_unrenderable_row_exits_2_before_anything_is_written(tmp_path, tiny_model):
    train = tmp_path / "chat.jsonl"
    train.write_text(json.dumps({"messages": [USER, {"role": "assistant", "content": "5"}]}) + "\n"
                     + json.dumps({"messages": [USER, {"role": "assistant"}]}) + "\n")
    r = itertrain("train", "--model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "exp"),
                  "--train_file", str(train), *FAST_FLAGS)
    assert r.returncode == 2, r.output
    assert f"{train}: row 1 cannot be rendered with the chat template of {tiny_model}" in r.stderr, r.stderr
    assert not (tmp_path / "exp").exists()


def _conversation_files(d: Path) -> tuple[Path, Path]:
    rng = random.Random(0)
    train, prompts = d / "chat.jsonl", d / "chat_prompts.jsonl"
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}="},
                                                      {"role": "assistant", "content": str(a + b)}]}) + "\n"
                             for a, b in ((rng.randint(0, 50), rng.randint(0, 50)) for _ in range(32))))
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)})
                               + "\n" for a, b in ((rng.randint(0, 50), rng.randint(0, 50)) for _ in range(8))))
    # TRL's batched form: a conversational prompt's completions arrive as assistant message lists
    (d / "chat_reward.py").write_text("def score(prompts, completions, **kwargs):\n"
                                      "    return [float(len(c[0]['content']) % 3) for c in completions]\n")
    return train, prompts


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["expert_iteration", "iterative_dpo"])
def test_a_messages_dataset_runs_to_completion_and_samples_from_rendered_prompts(tmp_path, tiny_model, strategy):
    train, prompts = _conversation_files(tmp_path)
    out = tmp_path / "exp"
    r = itertrain("train", "--model_name_or_path", str(tiny_model), "--output_dir", str(out), "--strategy", strategy,
                  "--train_file", str(train), "--prompts_file", str(prompts), "--num_iterations", "2",
                  "--num_generations", "3", "--max_completion_length", "4", "--reward_funcs", "chat_reward:score",
                  *FAST_FLAGS, "--max_steps", "4",
                  *(["--reward_threshold", "0"] if strategy == "expert_iteration" else ["--min_reward_margin", "0"]),
                  cwd=tmp_path)
    assert r.returncode == 0, r.output
    assert "experiment complete: 2 iteration(s) committed" in r.output
    name = "accepted.jsonl" if strategy == "expert_iteration" else "pairs.jsonl"
    rows = [json.loads(line) for line in (out / "data" / "iter_1" / name).read_text().splitlines()]
    assert rows and all(row["prompt"][0]["role"] == "user" for row in rows)
    answers = [row["completion" if strategy == "expert_iteration" else "chosen"] for row in rows]
    assert all(a[0]["role"] == "assistant" for a in answers)  # kept in the shape of the prompt


@pytest.mark.slow
def test_conversational_rows_and_a_tokenizer_without_chat_template_exit_2_before_anything_is_written(tmp_path,
                                                                                                     tiny_model):
    import shutil

    model = tmp_path / "plain"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").unlink()
    train, _ = _conversation_files(tmp_path)
    r = itertrain("train", "--model_name_or_path", str(model), "--output_dir", str(tmp_path / "exp"),
                  "--train_file", str(train), *FAST_FLAGS)
    assert r.returncode == 2, r.output
    assert "has no chat template" in r.stderr and str(train) in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "exp" / "iter_0").exists()


# ---- --dataset_name ------------------------------------------------------------------------------------------
def _save_rows(path: Path, rows: list[dict], splits: tuple[str, ...] = ("train", "test")) -> None:
    from datasets import Dataset, DatasetDict

    keys = sorted({k for r in rows for k in r})  # every column (from_list would take the first row's only)
    columns = {k: [r.get(k) for r in rows] for k in keys}
    DatasetDict({s: Dataset.from_dict(columns) for s in splits}).save_to_disk(str(path))


def test_dataset_name_reads_a_save_to_disk_directory_a_folder_of_json_files_and_a_data_file(tmp_path):
    from itertrain.sources import dataset_rows
    from itertrain.errors import UsageError

    rows = [{"prompt": "1+1=", "completion": "2"}, {"text": "hello"}]
    _save_rows(tmp_path / "saved", rows)
    assert dataset_rows(str(tmp_path / "saved"), split="test") == rows  # the empty fields of a shared schema dropped
    with pytest.raises(UsageError, match="has the splits train, test; pass one with --dataset_split"):
        dataset_rows(str(tmp_path / "saved"), split="validation")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert dataset_rows(str(tmp_path / "folder")) == rows
    assert dataset_rows(str(tmp_path / "folder" / "train.jsonl")) == rows
    with pytest.raises(UsageError, match="does not exist"):
        dataset_rows(str(tmp_path / "missing.jsonl"))


@pytest.mark.slow
def test_a_hub_dataset_id_not_in_the_local_cache_exits_2_naming_it_and_how_to_fetch_it(tmp_path, tiny_model):
    r = itertrain("train", "--model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "exp"),
                  "--dataset_name", "some-org/no-such-dataset", *FAST_FLAGS)
    assert r.returncode == 2, r.output
    assert r.stderr.count("itertrain: error: ") == 1 and "Traceback" not in r.output, r.output
    assert "--dataset_name some-org/no-such-dataset: not a local path" in r.stderr
    assert "huggingface-cli download --repo-type dataset some-org/no-such-dataset" in r.stderr
    assert not (tmp_path / "exp" / "iter_0").exists()


@pytest.mark.slow
def test_dataset_name_trains_and_a_changed_dataset_under_the_same_name_is_refused_on_resume(tmp_path, tiny_model,
                                                                                          train_file):
    from conftest import manifest, tree_hash

    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    data, out = tmp_path / "ds", tmp_path / "exp"
    _save_rows(data, rows, ("train",))
    args = ["--model_name_or_path", str(tiny_model), "--output_dir", str(out), "--dataset_name", str(data),
            "--num_iterations", "1", *FAST_FLAGS]
    r = itertrain("train", *args, fault="checkpoint.save=kill#2")  # checkpoint-4 of iteration 0 committed
    assert r.returncode == -9, r.output
    recorded = manifest(out / "checkpoint-4")["lineage"]["train_data"]
    assert recorded["source"] == f"dataset {data}, split train"

    import shutil

    shutil.rmtree(data)
    _save_rows(data, [{**row, "completion": row["completion"] + "0"} for row in rows], ("train",))
    before = tree_hash(out)
    r = itertrain("train", *args, "--resume_from", "auto", "--resume_from_iteration", "auto")
    assert r.returncode == 2, r.output
    assert "checkpoint-4 of iteration 0 cannot be continued: the training data changed: " \
           f"dataset {data}, split train now has fingerprint" in r.stderr, r.output
    assert tree_hash(out) == before  # nothing written
    shutil.rmtree(data)
    _save_rows(data, rows, ("train",))  # the original rows back: the run continues and completes
    r = itertrain("train", *args, "--resume_from", "auto", "--resume_from_iteration", "auto")
    assert r.returncode == 0, r.output
    assert "Continuing at: iteration 0, step 4" in r.output
    assert manifest(out / "iter_0")["lineage"]["train_data"]["fingerprint"] == recorded["fingerprint"]


# ---- Hub model ids -------------------------------------------------------------------------------------------
def _hub_cache(cache: Path, repo_id: str, model: Path, revision: str = "0123456789abcdef") -> Path:
    """A local Hugging Face cache holding `model` as `repo_id`, laid out as huggingface_hub lays it out."""
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    shutil.copytree(model, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_a_hub_model_id_resolves_to_its_snapshot_in_the_local_cache_and_an_uncached_one_exits_2(
        tmp_path, model_dir, monkeypatch):
    from huggingface_hub import constants

    from itertrain.errors import UsageError
    from itertrain.parser import parse_train_args

    snapshot = _hub_cache(tmp_path / "hub", "some-org/tiny", model_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    rest = ["--output_dir", str(tmp_path / "out"), "--train_file", str(data)]
    cfg = parse_train_args(["--model_name_or_path", "some-org/tiny", "--tokenizer_name", "some-org/tiny", *rest])
    assert Path(cfg.model.model_name) == Path(cfg.model.tokenizer_name) == snapshot.resolve()
    with pytest.raises(UsageError) as e:
        parse_train_args(["--model_name_or_path", "some-org/missing", *rest])
    assert e.value.exit_code == 2
    assert "some-org/missing" in str(e.value) and "is not in the local cache" in str(e.value)
    assert "huggingface-cli download some-org/missing" in str(e.value)
    with pytest.raises(UsageError, match="does not exist. itertrain never downloads models"):
        parse_train_args(["--model_name_or_path", str(tmp_path / "no" / "such" / "dir"), *rest])


@pytest.mark.slow
def test_a_hub_model_id_from_a_local_cache_trains_offline_with_the_snapshots_fingerprint_in_the_lineage(
        tmp_path, tiny_model, train_file):
    from conftest import manifest

    from itertrain.artifacts.manifest import fingerprint

    snapshot = _hub_cache(tmp_path / "hub", "some-org/tiny", tiny_model)
    out = tmp_path / "exp"
    r = itertrain("train", "--model_name_or_path", "some-org/tiny", "--output_dir", str(out), "--train_file",
                  str(train_file), "--num_iterations", "1", *FAST_FLAGS,
                  env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.output
    lineage = manifest(out / "iter_0")["lineage"]
    assert lineage["weights_from"] == "base" and lineage["weights_id"] == fingerprint(snapshot)


def test_a_dataset_config_is_refused_for_a_save_to_disk_directory_and_a_data_file_which_have_none(tmp_path):
    from itertrain.errors import UsageError
    from itertrain.sources import dataset_rows

    _save_rows(tmp_path / "saved", [{"text": "hello"}])
    with pytest.raises(UsageError, match=r"^--dataset_config en: .*saved is a save_to_disk directory, which has no "
                                         "configurations; drop --dataset_config"):
        dataset_rows(str(tmp_path / "saved"), "en")
    (tmp_path / "rows.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(UsageError, match="is a data file, which has no configurations"):
        dataset_rows(str(tmp_path / "rows.jsonl"), "en")
