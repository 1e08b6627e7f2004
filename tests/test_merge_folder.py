"""The output folder has one owner: its file names appear in one module, licences live in the merge state."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

import hf_merge
from hf_merge.errors import MergeStateError
from hf_merge.io.merge_folder import STATE_FILENAME, MergeFolder, MergeState
from hf_merge.publish.card import build_card, write_card

PACKAGE = Path(hf_merge.__file__).parent
OWNER = PACKAGE / "io" / "merge_folder.py"
OWNED_NAMES = ("merge_state.json", "eval_results.json", "recipe.yaml")
BASE, EXPERT = "org/base", "org/expert"


def _literals(path: Path) -> list[tuple[int, str]]:
    """String constants of a module that are an owned file's name or path (no prose: no spaces),
    docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if any(name in node.value for name in OWNED_NAMES) and not any(c.isspace() for c in node.value):
                found.append((node.lineno, node.value))
    return found


def test_only_the_owner_names_the_folders_files():
    offenders = {str(path.relative_to(PACKAGE)): _literals(path) for path in PACKAGE.rglob("*.py")
                 if path != OWNER and "_resources" not in path.parts}
    assert {path: found for path, found in offenders.items() if found} == {}
    assert {name for _, name in _literals(OWNER)} >= set(OWNED_NAMES)  # the reader sees the owner's names


def test_the_literal_finder_sees_a_string_and_skips_a_docstring(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""Reads recipe.yaml."""\nNAME = "merge_state.json"\nPATH = "out/recipe.yaml"\nTEXT = "see recipe.yaml"\n')
    assert _literals(module) == [(2, "merge_state.json"), (3, "out/recipe.yaml")]


def _folder(tmp_path: Path) -> Path:
    state = MergeState(method="average", hyperparameters={}, step=1,
                       base={"repo_id": BASE, "commit_sha": "a" * 40, "name": BASE},
                       lineage=[{"repo_id": EXPERT, "commit_sha": "b" * 40, "name": EXPERT, "step": 1}])
    state.save(tmp_path)
    return tmp_path


def test_licences_are_kept_in_the_merge_state_not_the_card(tmp_path):
    folder = _folder(tmp_path)
    write_card(folder, licenses={BASE: "mit", EXPERT: "apache-2.0"}, plot=False)
    saved = json.loads((folder / STATE_FILENAME).read_text())
    assert saved["parent_licenses"] == {BASE: "mit", EXPERT: "apache-2.0"}
    assert "hf-merge parent licenses" not in (folder / "README.md").read_text()
    # A regenerated card (licences not given) knows them from the state.
    card = build_card(folder, plot=False)
    assert card.data.license == "other" and "`org/expert`: apache-2.0" in card.text


def test_an_old_folder_keeps_its_licences_from_the_card_comment(tmp_path):
    folder = _folder(tmp_path)
    # As cards before the licences moved into the state kept them.
    (folder / "README.md").write_text(
        "---\nlicense: mit\n---\n# merged\n\n<!-- hf-merge parent licenses: "
        + json.dumps({BASE: "mit", EXPERT: "mit"}) + " -->\n")
    assert MergeFolder(folder).licenses() == {BASE: "mit", EXPERT: "mit"}
    path = write_card(folder, plot=False)
    assert ModelCard.load(path).data.license == "mit"
    write_card(folder, licenses=MergeFolder(folder).licenses(), plot=False)
    assert json.loads((folder / STATE_FILENAME).read_text())["parent_licenses"] == {BASE: "mit", EXPERT: "mit"}


def test_a_state_without_licences_reads_as_before(tmp_path):
    folder = _folder(tmp_path)
    assert "parent_licenses" not in json.loads((folder / STATE_FILENAME).read_text())
    assert MergeFolder(folder).licenses() == {}
    assert MergeState.load(folder) == MergeFolder(folder).state(strict=True)


def test_reading_to_show_tolerates_an_early_state_resuming_does_not(tmp_path):
    (tmp_path / STATE_FILENAME).write_text(json.dumps({
        "method": "opcm", "hyperparameters": {}, "experts": [{"repo_id": EXPERT, "commit_sha": "b" * 40}], "extra": 1}))
    base, experts = MergeFolder(tmp_path).lineage()
    assert experts == [{"repo_id": EXPERT, "commit_sha": "b" * 40, "step": 1}]
    with pytest.raises(MergeStateError, match="corrupt"):
        MergeState.load(tmp_path)
    with pytest.raises(MergeStateError, match="not an hf-merge result"):
        MergeFolder(tmp_path / "missing").state()


def test_recording_licences_keeps_keys_this_version_does_not_know(tmp_path):
    folder = _folder(tmp_path)
    data = json.loads((folder / STATE_FILENAME).read_text()) | {"written_by_a_later_version": [1, 2]}
    (folder / STATE_FILENAME).write_text(json.dumps(data))
    MergeFolder(folder).record_licenses({BASE: "mit", EXPERT: None})
    saved = json.loads((folder / STATE_FILENAME).read_text())
    assert saved["written_by_a_later_version"] == [1, 2] and saved["parent_licenses"] == {BASE: "mit", EXPERT: None}
    assert MergeFolder(folder).licenses() == {BASE: "mit", EXPERT: None}
