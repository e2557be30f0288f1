"""The docs do not drift: every command block marked runnable runs, and nothing cites a path outside the repository.

A block is runnable when the line before its opening ```bash fence is `<!-- runnable -->`. Each page's
runnable blocks run in order, in one fresh directory, with `bash -euo pipefail`, `itertrain`, `torchrun`
and `python` from this environment on PATH and the repository's `train_iterative.py` beside them; the
blocks make their own tiny model (`itertrain init-model`) and use cheap flags. Keep the marked set
small: the slow test below must stay under 2 minutes on an idle 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, base_env

RUNNABLE = re.compile(r"^<!-- runnable -->\n```bash\n(.*?)^```", re.M | re.S)
MAX_README_LINES = 250
# Written in pieces so that this file does not match itself.
OUTSIDE = [
    ("a path outside the repository", re.compile(re.escape("../" + "shared"))),
    ("a section of an outside spec", re.compile("SPEC" + r"\s*§")),
    ("an issue number", re.compile(r"\b[Ii]ssue" + r"s? #?\d+")),
]
MD_LINK = re.compile(r"\]\(([^)#\s]+)(?:#([^)\s]*))?\)")


def doc_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def runnable_blocks(page: Path) -> list[str]:
    return RUNNABLE.findall(page.read_text())


def pages_with_runnable_blocks() -> list[str]:
    return [str(p.relative_to(REPO)) for p in doc_pages() if runnable_blocks(p)]


def repository_text_files() -> list[Path]:
    """The repository's text files (git's list: tracked or not ignored), or outside a git checkout the tree less venvs and outputs."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True)
    if r.returncode == 0:
        paths = [REPO / name for name in r.stdout.decode().split("\0") if name]
    else:
        skip = (".git", ".venv", "site", "build", "dist", "__pycache__", ".pytest_cache", "experiments", "itertrain-demo")
        paths = [p for p in REPO.rglob("*") if not any(part.startswith(skip) for part in p.relative_to(REPO).parts)]
    files = []
    for path in paths:
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if b"\0" not in data[:8192]:
                files.append(path)
    return files


def test_readme_has_at_most_250_lines():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail to a page under docs/"


def test_no_file_in_the_repository_cites_a_path_issue_or_spec_outside_it():
    found = []
    for path in repository_text_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for what, pattern in OUTSIDE:
                if pattern.search(line):
                    found.append(f"{path.relative_to(REPO)}:{n}: {what}: {line.strip()}")
    assert not found, "cite docs/design.md (by section) or nothing:\n" + "\n".join(found)


def test_every_page_closes_its_code_blocks():
    # An unclosed fence turns the rest of a page into code (GitHub renders README.md without MkDocs).
    unclosed = [str(p.relative_to(REPO)) for p in doc_pages()
                if sum(line.lstrip().startswith("```") for line in p.read_text().splitlines()) % 2]
    assert not unclosed, f"a code block is never closed in {unclosed}"


def heading_anchors(page: Path) -> set[str]:
    """The anchors MkDocs gives the page's headings (Python-Markdown's toc slugify)."""
    anchors, fence = set(), False
    for line in page.read_text().splitlines():
        fence ^= line.lstrip().startswith("```")
        if not fence and line.startswith("#"):
            title = re.sub(r"[^\w\s-]", "", line.lstrip("#").strip()).strip().lower()
            anchors.add(re.sub(r"[-\s]+", "-", title))
    return anchors


def test_readme_links_point_at_files_and_headings_inside_the_repository():
    # The docs pages' links are checked by `mkdocs build --strict`; the README is outside docs/.
    bad = []
    for target, anchor in MD_LINK.findall((REPO / "README.md").read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        resolved = (REPO / target).resolve()
        if not resolved.is_relative_to(REPO) or not resolved.exists():
            bad.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
            bad.append(f"{target}#{anchor}")
    assert not bad, f"README.md links to what the repository does not hold: {bad}"


def test_the_docs_mark_command_blocks_runnable():
    # The slow test below runs them; a marker typo would silently leave it with nothing to run.
    assert "README.md" in pages_with_runnable_blocks()  # its first run, included in docs/getting-started.md
    assert "docs/recovery.md" in pages_with_runnable_blocks()


@pytest.mark.slow
@pytest.mark.parametrize("page", pages_with_runnable_blocks())
def test_runnable_blocks_of_the_page_run_against_a_tiny_model(page, tmp_path):
    (tmp_path / "train_iterative.py").symlink_to(REPO / "train_iterative.py")
    env = base_env({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    for n, block in enumerate(runnable_blocks(REPO / page), 1):
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600, start_new_session=True)
        assert r.returncode == 0, f"{page}, runnable block {n} exited {r.returncode}:\n{block}\n{r.stdout}\n{r.stderr}"


def test_the_architecture_page_names_every_module():
    page = (REPO / "docs" / "architecture.md").read_text()
    package = REPO / "itertrain"
    modules = [p.relative_to(package).as_posix() for p in sorted(package.rglob("*.py"))]
    named = {m for m in modules if f"`{m}`" in page or f"`{m.rsplit('/', 1)[-1]}`" in page}
    missing = [m for m in modules if m not in named and m.rsplit("/", 1)[-1] not in ("__init__.py", "__main__.py")]
    assert not missing, f"docs/architecture.md does not name {missing}: add each to the module map"


@pytest.mark.slow
def test_the_readmes_strategy_on_trls_kto_trainer_runs_as_written_for_two_iterations(tmp_path, tiny_model):
    pytest.importorskip("trl")
    from conftest import FAST_FLAGS, itertrain, manifest

    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- --8<-- \[start:kto\] -->\n```python\n(.*?)^```", readme, re.M | re.S).group(1)
    (tmp_path / "kto_strategy.py").write_text(block)
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b if (a + b) % 3 else a + b + 1),
             "label": bool((a + b) % 3)} for a in range(8) for b in range(8)]
    (tmp_path / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "exp"
    r = itertrain("train", "--strategy", "kto_strategy:KTO", "--model_name_or_path", str(tiny_model),
                  "--output_dir", str(out), "--train_file", str(tmp_path / "kto.jsonl"), "--num_iterations", "2",
                  *FAST_FLAGS, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.output
    assert [manifest(out / f"iter_{k}")["iteration"] for k in (0, 1)] == [0, 1]  # both committed
