"""Bad input: each mistake is one line on stderr, exit code 2 (usage) or 1 (run time), nothing pushed."""

from __future__ import annotations

import shutil

import pytest
from _cli import error_lines, hf_merge

from hf_merge.cli import main

TARGET = "alice/should-never-exist"


@pytest.fixture(scope="module")
def bad_repos(seeded_hub, hub_api, tmp_path_factory):
    """A private copy of an expert, and a CLIP expert of another size."""
    from hf_merge.testing.tiny_clip import build_tiny_clip

    private = "alice/bad-input-private"
    hub_api.create_repo(private, private=True, exist_ok=True)
    hub_api.upload_folder(repo_id=private, folder_path=seeded_hub.expert_dirs[0])
    other = build_tiny_clip(tmp_path_factory.mktemp("other-arch"), seed=7, hidden_size=48)
    other_repo = "alice/bad-input-wider-clip"
    hub_api.create_repo(other_repo, exist_ok=True)
    hub_api.upload_folder(repo_id=other_repo, folder_path=other)
    return {"private": private, "other_arch": other_repo}


def _run(args, capsys, tmp_path, token=None):
    """``hf-merge merge ARGS --push-to-hub TARGET`` in-process; returns (exit code, stderr)."""
    argv = ["merge", *args, "--output", str(tmp_path / "out"), "--push-to-hub", TARGET, "-q"]
    if token:
        argv += ["--token", token]
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def _assert_one_line(stderr: str) -> str:
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("hf-merge: error: ")
    return lines[0]


@pytest.fixture(autouse=True)
def _nothing_pushed(hub_api):
    yield
    assert not hub_api.repo_exists(TARGET)


def test_unknown_repo(seeded_hub, capsys, tmp_path, alice_token):
    code, err = _run(["--base", seeded_hub.base, "--experts", seeded_hub.experts[0], "alice/no-such-expert"], capsys, tmp_path, alice_token)
    assert code == 1
    assert "alice/no-such-expert not found" in _assert_one_line(err)
    assert not (tmp_path / "out").exists()  # checked before any weights were downloaded or merged


def test_unknown_revision(seeded_hub, capsys, tmp_path, alice_token):
    code, err = _run(["--base", seeded_hub.base, "--experts", f"{seeded_hub.experts[0]}@v9"], capsys, tmp_path, alice_token)
    assert code == 1
    assert "revision 'v9' not found" in _assert_one_line(err)


def test_private_repo_without_token(seeded_hub, bad_repos, capsys, tmp_path):
    code, err = _run(["--base", seeded_hub.base, "--experts", bad_repos["private"]], capsys, tmp_path)
    assert code == 1
    line = _assert_one_line(err)
    assert bad_repos["private"] in line and "--token" in line


def test_wrong_token(seeded_hub, capsys, tmp_path):
    code, err = _run(["--base", seeded_hub.base, "--experts", seeded_hub.experts[0]], capsys, tmp_path, "hf_wrong_token_123")
    assert code == 1
    line = _assert_one_line(err)
    assert "refused the token" in line and "hf_wrong_token_123" not in err


def test_expert_of_another_architecture(seeded_hub, bad_repos, capsys, tmp_path, alice_token):
    code, err = _run(["--base", seeded_hub.base, "--experts", seeded_hub.experts[0], bad_repos["other_arch"]], capsys, tmp_path, alice_token)
    assert code == 1
    line = _assert_one_line(err)
    assert bad_repos["other_arch"] in line and "hidden_size is 48 instead of 32" in line


def test_yaml_with_a_typo(seeded_hub, capsys, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base: {seeded_hub.base}\nexperts: [{seeded_hub.experts[0]}]\nmethod: opcm\nparameters:\n  alpah: 0.5\n")
    code, err = _run(["--config", str(recipe)], capsys, tmp_path)
    assert code == 2
    assert "did you mean 'alpha'" in _assert_one_line(err)
    recipe.write_text(f"base: {seeded_hub.base}\nexpert: [{seeded_hub.experts[0]}]\n")
    code, err = _run(["--config", str(recipe)], capsys, tmp_path)
    assert code == 2
    assert "unknown key 'expert'" in _assert_one_line(err) and "did you mean 'experts'" in err


def test_base_listed_as_expert(seeded_hub, capsys, tmp_path):
    code, err = _run(["--base", seeded_hub.base, "--experts", seeded_hub.experts[0], seeded_hub.base], capsys, tmp_path)
    assert code == 2
    assert "also listed as an expert" in _assert_one_line(err)


def test_expert_listed_twice(seeded_hub, capsys, tmp_path):
    code, err = _run(["--base", seeded_hub.base, "--experts", seeded_hub.experts[0], seeded_hub.experts[1], seeded_hub.experts[0]], capsys, tmp_path)
    assert code == 2
    assert "listed twice" in _assert_one_line(err)


def test_missing_flags_and_unknown_task(seeded_hub, capsys, tmp_path):
    code, err = _run(["--experts", seeded_hub.experts[0]], capsys, tmp_path)
    assert code == 2 and "--base" in _assert_one_line(err)
    code, err = _run(["--base", seeded_hub.base, "--experts", seeded_hub.experts[0], "--eval", "no-such-task"], capsys, tmp_path)
    assert code == 2 and "unknown task 'no-such-task'" in _assert_one_line(err)


@pytest.mark.slow
def test_exit_codes_from_a_real_process(seeded_hub, tmp_path):
    usage = hf_merge(["merge", "--base", seeded_hub.base, "--experts", seeded_hub.base, "--push-to-hub", TARGET])
    assert usage.returncode == 2 and len(error_lines(usage.stderr)) == 1
    runtime = hf_merge(["merge", "--base", seeded_hub.base, "--experts", "alice/nope", "--push-to-hub", TARGET,
                        "--output", str(tmp_path / "o")])
    assert runtime.returncode == 1 and len(error_lines(runtime.stderr)) == 1
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


def test_missing_local_folder(seeded_hub, capsys, tmp_path, alice_token):
    missing = str(tmp_path / "no-such-folder")
    code, err = _run(["--base", seeded_hub.base, "--experts", seeded_hub.experts[0], missing], capsys, tmp_path, alice_token)
    assert code == 1
    line = _assert_one_line(err)
    assert missing in line and "neither an existing folder nor a valid repo id" in line
