"""``transformers`` against the local Hub through ``HF_ENDPOINT``, and the ``hf-merge hub serve`` command."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import httpx
import pytest
import torch
from huggingface_hub import constants
from transformers import CLIPConfig, CLIPModel

from hf_merge.cli.hub import parse_tokens
from hf_merge.errors import UsageError
from hf_merge.testing.net import free_port


def _tiny_clip_config() -> CLIPConfig:
    return CLIPConfig(
        text_config={
            "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 8,
        },
        vision_config={
            "image_size": 16, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2,
        },
        projection_dim=8,
    )


def test_push_to_hub_then_from_pretrained_gives_identical_logits(hub_server, hub_api, alice_token, tmp_path):
    # transformers only knows the endpoint from HF_ENDPOINT, which conftest pointed at this server.
    assert constants.ENDPOINT == hub_server.url
    torch.manual_seed(0)
    model = CLIPModel(_tiny_clip_config()).eval()
    repo_id = f"alice/tiny-clip-{uuid.uuid4().hex[:8]}"
    commit = model.push_to_hub(repo_id, token=alice_token)

    files = {entry.path: entry for entry in hub_api.list_repo_tree(repo_id)}
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert files["model.safetensors"].lfs is not None  # weights are stored as a Git LFS object

    loaded = CLIPModel.from_pretrained(repo_id, cache_dir=tmp_path).eval()
    inputs = {
        "input_ids": torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1)),
        "pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)),
    }
    with torch.no_grad():
        expected, actual = model(**inputs), loaded(**inputs)
    assert torch.equal(expected.logits_per_image, actual.logits_per_image)
    assert torch.equal(expected.logits_per_text, actual.logits_per_text)
    assert hub_api.model_info(repo_id).sha == commit.oid


def test_parse_tokens():
    assert parse_tokens(["alice=one", "bob=two"]) == {"alice": "one", "bob": "two"}
    for bad in (["alice"], ["alice="], ["=secret"], ["a=x", "a=y"], ["a=x", "b=x"]):
        with pytest.raises(UsageError):
            parse_tokens(bad)


def test_parse_tokens_from_file(tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text("# users\nalice=one\n\nbob=two\n")
    assert parse_tokens(["carol=three"], token_file) == {"carol": "three", "alice": "one", "bob": "two"}




def test_cli_serve_answers_the_client(tmp_path):
    port = free_port()
    command = [
        sys.executable, "-m", "hf_merge.cli", "hub", "serve",
        "--root", str(tmp_path / "root"), "--port", str(port), "--token", "dave=dave-secret",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                response = httpx.get(f"{url}/api/whoami-v2", headers={"Authorization": "Bearer dave-secret"})
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read()
                time.sleep(0.1)
        assert response.status_code == 200 and response.json()["name"] == "dave"
        created = httpx.post(
            f"{url}/api/repos/create", headers={"Authorization": "Bearer dave-secret"}, json={"name": "m"}
        )
        assert created.json()["url"] == f"{url}/dave/m"
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
    assert f"Local Hub at http://127.0.0.1:{port}" in output
    assert "dave-secret" not in output
    assert (tmp_path / "root" / "repos" / "models" / "dave" / "m" / "repo.json").exists()
    assert os.environ["HF_HUB_DISABLE_XET"] == "1"
