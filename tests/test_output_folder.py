"""A bad --output is one line before any download or merge work."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from hf_merge import output_folder
from hf_merge.cli import main
from hf_merge.errors import UsageError
from hf_merge.output_folder import check_output_folder, weights_bytes


def test_an_existing_file_is_refused(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("not a folder")
    with pytest.raises(UsageError, match="is an existing file, not a folder"):
        check_output_folder(target)
    assert target.read_text() == "not a folder"


def test_a_file_in_the_middle_of_the_path_is_refused(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UsageError, match="cannot be created: .*a-file is a file"):
        check_output_folder(tmp_path / "a-file" / "out")


def test_an_unwritable_place_is_refused():
    # /proc refuses new files even to root, unlike a folder with its write bits removed.
    with pytest.raises(UsageError, match="is not writable"):
        check_output_folder("/proc/hf-merge-output")


def test_a_full_disk_is_refused(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(output_folder.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 5 * 2**20, 5 * 2**20))
    with pytest.raises(UsageError, match=r"5\.0 MiB free on its disk, a merge of this base needs about 8\.0 MiB"):
        check_output_folder(tmp_path / "out", weights_bytes=4 * 2**20)
    check_output_folder(tmp_path / "out", weights_bytes=2 * 2**20)  # 4 MiB needed, 5 MiB free
    assert not (tmp_path / "out").exists()  # checking creates nothing


def test_weights_bytes_of_a_folder_and_of_a_hub_repo(tiny_base, seeded_hub):
    local = weights_bytes(str(tiny_base))
    assert local == sum(f.stat().st_size for f in tiny_base.glob("*.safetensors")) and local > 0
    assert weights_bytes(seeded_hub.base) == local  # the same files, sized by the Hub without a download


@pytest.mark.parametrize("make_output", ["file", "unwritable", "full-disk"])
def test_the_cli_stops_before_downloading(make_output, seeded_hub, tmp_path, capsys, monkeypatch, alice_token):
    if make_output == "file":
        output = tmp_path / "out"
        output.write_text("x")
        expected = "is an existing file"
    elif make_output == "unwritable":
        output, expected = "/proc/hf-merge-out", "is not writable"
    else:
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(output_folder.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1024, 1024))
        output, expected = tmp_path / "out", "free on its disk"
    downloads = []
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: downloads.append(a) or shutil.Error())
    code = main(["merge", "--base", seeded_hub.base, "--experts", *seeded_hub.experts[:2], "--output", str(output),
                 "--token", alice_token, "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("hf-merge: error: --output") and expected in err[0]
    assert downloads == []
