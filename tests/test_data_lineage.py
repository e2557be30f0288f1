"""The training data is in the lineage: a mid-iteration resume on different rows is refused (exit 2)
naming the data and both fingerprints, `status` shows it, and --allow_config_change continues on the
new rows with the report saying so."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest

from conftest import FAST_FLAGS, itertrain, manifest, tree_hash

pytestmark = pytest.mark.slow  # real processes: training, kills

AUTO = ("--resume_from", "auto", "--resume_from_iteration", "auto")


def test_replaced_train_file_refuses_the_mid_iteration_resume_status_shows_it_and_the_override_continues(
        tmp_path, tiny_model, train_file):
    data = tmp_path / "train.jsonl"
    shutil.copy(train_file, data)
    out = tmp_path / "exp"
    args = ["--model_name", str(tiny_model), "--output_dir", str(out), "--train_file", str(data),
            "--num_iterations", "1", *FAST_FLAGS]
    r = itertrain("train", *args, fault="checkpoint.save=kill#2")  # checkpoint-4 of iteration 0 committed
    assert r.returncode == -9, r.output
    recorded = manifest(out / "checkpoint-4")["lineage"]["train_data"]
    assert recorded["source"] == str(data)

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**row, "completion": row["completion"] + "0"}) + "\n" for row in rows))
    before = tree_hash(out)
    r = itertrain("train", *args, *AUTO)
    assert r.returncode == 2, r.output
    assert r.stderr.count("itertrain: error: ") == 1, r.output
    assert f"checkpoint-4 of iteration 0 cannot be continued: the training data changed: {data} now has " \
           "fingerprint " in r.stderr and f"trained on fingerprint {recorded['fingerprint']}" in r.stderr, r.output
    assert tree_hash(out) == before  # nothing written

    r = itertrain("status", str(out))
    assert "training data of checkpoint-4: " in r.stdout and "CHANGED: the training data changed" in r.stdout, r.output
    status = json.loads(itertrain("status", str(out), "--json").stdout)
    assert status["training_data"]["fingerprint"] == recorded["fingerprint"]
    assert status["training_data"]["changed"] and status["training_data"]["now"] != recorded["fingerprint"]

    r = itertrain("train", *args, *AUTO, "--allow_config_change")
    assert r.returncode == 0, r.output
    assert "(continuing checkpoint-4 on the new data, allowed by --allow_config_change)" in r.output, r.output
    assert "Continuing at: iteration 0, step 4" in r.output
    assert manifest(out / "iter_0")["lineage"]["train_data"]["fingerprint"] != recorded["fingerprint"]


PLUGIN = textwrap.dedent("""
    import os
    from itertrain import Strategy

    class Shifting(Strategy):
        def train_rows(self, iteration):
            shift = int(os.environ.get("SHIFT", "0"))
            # a tuple, not a list: any finite sequence of rows is fingerprinted
            return tuple({"prompt": f"{a}+{shift}=", "completion": str(a + shift)} for a in range(40))
""")


def test_a_plugin_whose_train_rows_differ_between_launches_is_refused_naming_the_strategy(tmp_path, tiny_model):
    work = tmp_path / "project"
    work.mkdir()
    (work / "shiftmod.py").write_text(PLUGIN)
    out = tmp_path / "exp"
    args = ["--model_name", str(tiny_model), "--output_dir", str(out), "--strategy", "shiftmod:Shifting",
            "--num_iterations", "1", *FAST_FLAGS]
    r = itertrain("train", *args, fault="checkpoint.save=kill#2", cwd=work)
    assert r.returncode == -9, r.output
    before = tree_hash(out)
    r = itertrain("train", *args, *AUTO, cwd=work, env={"SHIFT": "1"})
    assert r.returncode == 2, r.output
    assert "the training data changed: Shifting.train_rows(0) now has fingerprint " in r.stderr, r.output
    assert tree_hash(out) == before
    r = itertrain("train", *args, *AUTO, cwd=work)  # the same rows again: it continues
    assert r.returncode == 0 and "Continuing at: iteration 0, step 4" in r.output, r.output


def test_rows_given_as_a_datasets_dataset_are_fingerprinted_like_the_same_rows_as_a_list():
    import datasets

    from itertrain import data_lineage

    rows = [{"prompt": f"{a}+1=", "completion": str(a + 1)} for a in range(5)]

    class Plugin:
        def __init__(self, rows):
            self.rows = rows

        def train_rows(self, iteration):
            return self.rows

        def rows_source(self, iteration):
            return "Plugin.train_rows(0)"

    as_list = data_lineage.current(Plugin(rows), 0)
    as_dataset = data_lineage.current(Plugin(datasets.Dataset.from_list(rows)), 0)
    assert as_list is not None and as_dataset == as_list
    assert data_lineage.current(Plugin(r for r in rows), 0) is None  # a generator might never end
