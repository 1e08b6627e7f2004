"""The package's public names resolve, are documented, and the CLI lists every subcommand."""

import subprocess
import sys

import pytest

import hf_merge


@pytest.mark.parametrize("name", hf_merge.__all__)
def test_public_name_resolves_and_is_documented(name):
    obj = getattr(hf_merge, name)
    assert obj.__doc__ and obj.__doc__.strip(), f"{name} has no docstring"


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        hf_merge.no_such_name  # noqa: B018


def test_cli_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "hf_merge.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("merge", "add", "card", "push", "eval", "space", "hub", "demo"):
        assert f"    {command} " in out.stdout, f"`hf-merge {command}` missing from --help"


def test_cli_without_command_is_a_usage_error():
    out = subprocess.run([sys.executable, "-m", "hf_merge.cli"], capture_output=True, text=True)
    assert out.returncode == 2


def test_copying_a_merge_leaves_its_working_files_behind(tmp_path):
    from hf_merge.continuation import copy_result as _copy_result
    from hf_merge.merging.state import OutputTransaction

    source = tmp_path / "source"
    for step in (1, 2):
        tx = OutputTransaction(source)
        (tx.staging / "model.safetensors").write_text(f"weights {step}")
        (tx.staging / "merge_state.json").write_text(f'{{"step": {step}}}')
        tx.commit(["model.safetensors"])
    OutputTransaction(source)  # a step that never finished: its staging folder is left over
    assert sorted(p.name for p in source.iterdir()) == [
        ".hf-merge-spare", ".hf-merge-staging", "merge_state.json", "model.safetensors"
    ]
    _copy_result(source, tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["merge_state.json", "model.safetensors"]
    assert (tmp_path / "copy" / "model.safetensors").read_text() == "weights 2"
