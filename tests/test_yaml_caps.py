"""Every YAML hf-merge reads is capped in size, refuses aliases and never echoes a long value."""

from __future__ import annotations

import pytest

from hf_merge.errors import RecipeError
from hf_merge.io.yaml_file import MAX_YAML_BYTES, load_yaml, read_yaml
from hf_merge.recipe import MergeRecipe
from hf_merge.watch.policy import load_policy_file

BASE, EXPERT = "org/base", "org/expert"
# A "billion laughs": nine levels of nine aliases each, 9**9 strings once expanded (gigabytes).
BOMB = "".join(
    f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else '"lol"'] * 9) + "]\n" for i in range(10)
)


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and len(message) < 300, message
    return message


def test_an_alias_bomb_in_eval_tasks_is_refused_before_it_expands():
    text = f"base: {BASE}\nexperts: [{EXPERT}]\n{BOMB}eval:\n  tasks: *l9\n"
    with pytest.raises(RecipeError) as error:
        MergeRecipe.from_yaml(text, source="bomb.yaml")
    assert "bomb.yaml uses a YAML alias *l0" in _one_line(error)
    assert error.value.exit_code == 2


def test_an_alias_bomb_in_a_policy_file_is_refused(tmp_path):
    (tmp_path / "policy.yaml").write_text(f"{BOMB}watch:\n  licenses: *l9\n")
    with pytest.raises(RecipeError) as error:
        load_policy_file(str(tmp_path / "policy.yaml"))
    assert "policy.yaml uses a YAML alias" in _one_line(error)


def test_a_merge_key_is_an_alias_too():
    with pytest.raises(RecipeError, match="alias"):
        load_yaml("a: &x {k: 1}\nb:\n  <<: *x\n", source="r")


def test_plain_yaml_still_reads():
    assert load_yaml("a: [1, 2]\nb: {c: true}\n", source="r") == {"a": [1, 2], "b": {"c": True}}


def test_a_100_mb_file_is_refused_by_its_size_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as handle:  # sparse: 100 MiB on paper, nothing on the disk
        handle.write(b"base: x\nexperts: [y]\nunknown: ")
        handle.truncate(100 << 20)
    import pathlib

    def no_read(self, *args, **kwargs):
        raise AssertionError(f"{self} was read")

    monkeypatch.setattr(pathlib.Path, "read_bytes", no_read)
    monkeypatch.setattr(pathlib.Path, "read_text", no_read)
    with pytest.raises(RecipeError) as error:
        MergeRecipe.load(path)
    assert _one_line(error) == "huge.yaml is 100 MiB, larger than the 1 MiB hf-merge reads as YAML"
    with pytest.raises(RecipeError, match="larger than"):
        read_yaml(path)


def test_text_over_the_cap_is_refused_before_parsing():
    text = "base: x\nexperts: [y]\nnote: " + "a" * MAX_YAML_BYTES
    with pytest.raises(RecipeError) as error:
        MergeRecipe.from_yaml(text, source="big.yaml")
    assert _one_line(error) == "big.yaml is larger than 1 MiB, the most hf-merge reads as YAML"
    # Multi-byte characters count as bytes.
    with pytest.raises(RecipeError, match="larger than"):
        load_yaml("é" * (MAX_YAML_BYTES // 2 + 1), source="r")


@pytest.mark.parametrize("data, key", [
    ({"scope": "v" * 10_000}, "scope"),
    ({"seed": "s" * 10_000}, "seed"),
    ({"parameters": {"alpha": "a" * 10_000}}, "alpha"),
    ({"parameters": {"b" * 10_000: 1}}, "parameter"),
    ({"watch": {"max_forgetting": "m" * 10_000}}, "watch.max_forgetting"),
    ({"watch": {"owners": ["o" * 10_000, 1]}}, "watch.owners"),
    ({"k" * 10_000: 1}, "unknown key"),
    ({"push_to_hub": "alice/" + "x" * 10_000}, "push_to_hub"),
])
def test_a_long_bad_value_is_shown_as_a_short_excerpt(data, key):
    import hf_merge.watch.policy  # noqa: F401  (the watch: section)

    with pytest.raises(RecipeError) as error:
        MergeRecipe.from_dict({"base": BASE, "experts": [EXPERT], **data})
    message = _one_line(error)
    assert key in message and "..." in message


def test_an_alias_bomb_in_a_remote_recipe_stops_add_with_one_line(seeded_hub, hub_api, alice_token, tmp_path, capsys):
    """``hf-merge add`` on someone else's merged repo whose recipe.yaml is a bomb."""
    from hf_merge.cli import main
    from hf_merge.io.merge_folder import RECIPE_FILENAME
    from hf_merge.testing.tiny_clip import write_merge_result

    folder = write_merge_result(
        tmp_path / "bombed", seeded_hub.base_dir, seeded_hub.expert_dirs[:1],
        base={"name": seeded_hub.base, "repo_id": seeded_hub.base, "commit_sha": seeded_hub.commits[seeded_hub.base]},
        experts=[{"name": r, "repo_id": r, "commit_sha": seeded_hub.commits[r]} for r in seeded_hub.experts[:1]],
    )
    (folder / RECIPE_FILENAME).write_text(f"base: {seeded_hub.base}\n{BOMB}experts: *l9\n")
    repo = "alice/yaml-bomb-merged"
    hub_api.create_repo(repo, exist_ok=True)
    hub_api.upload_folder(repo_id=repo, folder_path=folder)
    capsys.readouterr()
    code = main(["add", repo, "--experts", seeded_hub.experts[1], "--output", str(tmp_path / "out"),
                 "--token", alice_token, "-q"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-merge")]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("hf-merge: error: recipe.yaml uses a YAML alias"), err
