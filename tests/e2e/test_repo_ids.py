"""Every repo id a command names is checked before anything is merged or downloaded: one line, exit 2."""

from __future__ import annotations

import pytest

from hf_merge import api
from hf_merge.cli import main
from hf_merge.hub.repo_ids import check_names


@pytest.fixture(scope="module")
def merged_folder(tiny_base, tiny_experts, tmp_path_factory):
    return api.merge(base=str(tiny_base), experts=[str(e) for e in tiny_experts[:2]], method="average",
                     output=str(tmp_path_factory.mktemp("merged") / "out")).output_dir


@pytest.fixture
def no_model_lookups(monkeypatch):
    """Fail the test if a command gets as far as looking a model up."""
    def looked_up(*args, **kwargs):
        raise AssertionError("a model was looked up before the repo ids were checked")

    monkeypatch.setattr(api, "check_models", looked_up)
    monkeypatch.setattr(api, "resolve", looked_up)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hf-merge: error: ")
    return lines[0]


@pytest.mark.parametrize("flag", ["--push-to-hub", "--space"])
def test_merge_refuses_a_bad_target_before_merging(flag, tiny_base, tiny_experts, tmp_path, capsys, no_model_lookups):
    out = tmp_path / "out"
    argv = ["merge", "--base", str(tiny_base), "--experts", str(tiny_experts[0]), "--output", str(out), "-q",
            flag, "alice/x y"]
    if flag == "--space":
        argv += ["--push-to-hub", "alice/fine"]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    # the recipe refuses it while it is read, before any download or merge
    target = "push_to_hub" if flag == "--push-to-hub" else "space"
    assert f"`{target}` must be a repo id `USER/NAME`, got 'alice/x y'" in line
    assert not out.exists()


def test_a_newline_in_a_repo_id_is_one_escaped_line(merged_folder, capsys):
    assert main(["push", str(merged_folder), "--repo-id", "alice/x\ny", "-q"]) == 2
    line = _one_error_line(capsys)
    assert "'alice/x\\ny'" in line  # escaped, never a raw line break


def test_a_newline_in_an_expert_reference_is_one_line(tiny_base, tmp_path, capsys, no_model_lookups):
    code = main(["merge", "--base", str(tiny_base), "--experts", "alice/tiny-clip-expert-0\nrm -rf /",
                 "--output", str(tmp_path / "out"), "-q"])
    assert code == 2
    assert "'alice/tiny-clip-expert-0\\nrm -rf /'" in _one_error_line(capsys)


def test_add_checks_its_repo_and_push_target(merged_folder, tiny_experts, tmp_path, capsys, no_model_lookups):
    assert main(["add", "alice/bad name", "--experts", str(tiny_experts[3]), "--output", str(tmp_path / "o"), "-q"]) == 2
    assert "'alice/bad name'" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()
    assert main(["add", str(merged_folder), "--experts", str(tiny_experts[3]), "--push-to-hub", "alice/a\x1b[2Jb", "-q"]) == 2
    assert "'alice/a\\x1b[2Jb'" in _one_error_line(capsys)


def test_card_and_space_publish_check_their_ids(merged_folder, capsys):
    assert main(["card", str(merged_folder), "--repo-id", "alice/..", "-q"]) == 2
    assert "'alice/..'" in _one_error_line(capsys)
    assert main(["space", "publish", "alice/fine", "--space", "alice/sp ace", "-q"]) == 2
    assert "'alice/sp ace'" in _one_error_line(capsys)


def test_check_names_accepts_what_the_hub_accepts():
    check_names(repo_ids={"push_to_hub": "alice/clip-vit_b32.opcm", "space": None},
                references={"expert": ["alice/e@main", "./some folder/with spaces"]})
