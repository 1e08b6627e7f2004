"""The Gradio Space: its configuration, input limits, API predictions, and publishing to the Hub."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import SpaceCard, snapshot_download
from PIL import Image

from hf_merge.cli import main as cli_main
from hf_merge.publish.space import build_space_config, insert_space_link, load_app_module
from hf_merge.resources import space_app_dir
from hf_merge.testing.net import free_port

EXAMPLE = space_app_dir() / "examples" / "red_square.png"




def reference_probabilities(folder: str | Path, image: Image.Image, labels: list[str]) -> dict[str, float]:
    """The model's own zero-shot computation: CLIPModel's forward, softmax over the prompts."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=[f"a photo of a {label}." for label in labels], images=image, return_tensors="pt", padding=True)
    with torch.no_grad():
        probabilities = model(**inputs).logits_per_image.softmax(dim=-1)[0]
    return dict(zip(labels, probabilities.tolist(), strict=False))


@pytest.fixture(scope="module")
def app():
    return load_app_module()




def test_config_from_the_hub_repo(seeded_merged_repo, seeded_hub, tmp_path):
    config = build_space_config(seeded_merged_repo, work_dir=tmp_path)
    assert config["model"] == "alice/tiny-clip-merged" and config["method"] == "average"
    assert config["base"] == {"name": seeded_hub.base, "repo_id": seeded_hub.base, "commit_sha": seeded_hub.commits[seeded_hub.base]}
    assert [e["repo_id"] for e in config["experts"]] == seeded_hub.experts[:3]
    assert [e["step"] for e in config["experts"]] == [1, 2, 3]
    assert all(e["commit_sha"] == seeded_hub.commits[e["repo_id"]] for e in config["experts"])
    assert config["tasks"]["mnist"] == [str(d) for d in range(10)]
    assert config["tasks"]["synthetic/colors"][:3] == ["red", "green", "blue"]
    assert len(config["tasks"]["eurosat"]) == 10
    assert [row["step"] for row in config["accuracy"]["rows"]] == [1, 2, 3]
    assert config["accuracy"]["rows"][0]["accuracy"] == [pytest.approx(0.9), None, None]
    assert config["plot"] == "accuracy.png"
    assert "path" not in json.dumps(config["experts"])


def test_space_examples_are_test_images_of_the_merged_tasks(seeded_merged_repo, tmp_path, app):
    from hf_merge.evaluation.synthetic import _RGB
    from hf_merge.publish.space import write_space_folder

    folder = write_space_folder(build_space_config(seeded_merged_repo, work_dir=tmp_path / "merge"), tmp_path / "space")
    config = json.loads((folder / "space_config.json").read_text())
    examples = config["examples"]
    colors = [e for e in examples if e["task"] == "synthetic/colors"]
    assert [(e["task"], e["label"]) for e in colors] == [("synthetic/colors", "red"), ("synthetic/colors", "green")]
    for example in colors:
        pixels = np.asarray(Image.open(folder / example["file"]).convert("RGB"), dtype=float)
        assert np.abs(pixels.mean(axis=(0, 1)) - np.array(_RGB[example["label"]])).max() < 6
    # mnist and eurosat are Hub datasets: shown when the Hub has them (replicas published by other
    # tests), left out otherwise; either way two of different classes at most, from the task's classes.
    for task in ("mnist", "eurosat"):
        picked = [e["label"] for e in examples if e["task"] == task]
        assert len(picked) in (0, 2) and len(set(picked)) == len(picked)
        assert set(picked) <= set(config["tasks"][task])
    assert {e["task"] for e in examples} <= {"synthetic/colors", "mnist", "eurosat"}
    assert sorted(p.name for p in (folder / "examples").iterdir()) == sorted(Path(e["file"]).name for e in examples)
    demo = app.build_demo(app.load_config(folder / "space_config.json"))
    (dataset,) = [c for c in demo.blocks.values() if type(c).__name__ == "Dataset"]
    assert dataset.sample_labels == [f"{e['task']}: {e['label']}" for e in examples]
    assert [sample[1] for sample in dataset.samples] == [e["task"] for e in examples]


def test_a_space_without_evaluated_tasks_keeps_the_generic_examples(tiny_base, tmp_path):
    from hf_merge.publish.space import write_space_folder

    folder = write_space_folder(build_space_config(tiny_base, work_dir=tmp_path / "merge"), tmp_path / "space")
    assert json.loads((folder / "space_config.json").read_text())["examples"] == []
    assert sorted(p.name for p in (folder / "examples").iterdir()) == sorted(p.name for p in EXAMPLE.parent.glob("*.png"))


def test_config_of_a_plain_model_folder(tiny_base, tmp_path):
    config = build_space_config(tiny_base, work_dir=tmp_path)
    assert config["model"] == str(tiny_base.resolve())
    assert config["experts"] == [] and config["tasks"] == {} and config["accuracy"] is None


def test_label_limits(app):
    assert app.parse_labels(" cat,dog ,\n a  red  square , cat") == ("cat", "dog", "a red square")
    with pytest.raises(app.gr.Error, match="at least two"):
        app.parse_labels("cat")
    with pytest.raises(app.gr.Error, match="Too many labels: 51"):
        app.parse_labels(",".join(f"l{i}" for i in range(51)))
    with pytest.raises(app.gr.Error, match="at most 100 characters"):
        app.parse_labels("cat, " + "x" * 101)


def test_image_limits(app, tmp_path):
    big = tmp_path / "big.png"
    Image.new("L", (5000, 4000)).save(big)  # 20 MP but a small file: refused before decoding
    assert big.stat().st_size < app.MAX_IMAGE_BYTES
    with pytest.raises(app.gr.Error, match="Image too large: 5000×4000"):
        app.open_image(str(big))
    heavy = tmp_path / "heavy.bin"
    heavy.write_bytes(b"\0" * (app.MAX_IMAGE_BYTES + 1))
    with pytest.raises(app.gr.Error, match="file too large"):
        app.open_image(str(heavy))
    text = tmp_path / "not.png"
    text.write_text("<svg/>")
    with pytest.raises(app.gr.Error, match="not an image"):
        app.open_image(str(text))
    assert app.open_image(str(EXAMPLE)).mode == "RGB"


def test_app_computation_equals_clip_forward(app, tiny_experts):
    labels = ("red square", "blue circle", "cat", "the number seven")
    image = Image.open(EXAMPLE).convert("RGB")
    predicted = app.ZeroShotModel(str(tiny_experts[0])).classify(image, labels)
    expected = reference_probabilities(tiny_experts[0], image, list(labels))
    assert predicted.keys() == expected.keys()
    for label in labels:
        assert predicted[label] == pytest.approx(expected[label], abs=1e-5)


def test_gradio_client_gets_the_models_predictions(space_url, seeded_merged_repo, seeded_hub):
    from gradio_client import Client, handle_file

    client = Client(space_url, verbose=False)
    labels = ["red square", "blue circle", "green triangle", "cat", "dog"]
    merged, compared, caption = client.predict(
        handle_file(str(EXAMPLE)), ", ".join(labels), "Free text", 3, "expert:1", api_name="/classify"
    )
    image = Image.open(EXAMPLE).convert("RGB")
    expected = reference_probabilities(snapshot_download(seeded_merged_repo), image, labels)
    top3 = sorted(expected, key=expected.get, reverse=True)[:3]
    assert merged["label"] == top3[0]
    assert [c["label"] for c in merged["confidences"]] == top3
    for item in merged["confidences"]:
        assert item["confidence"] == pytest.approx(expected[item["label"]], abs=1e-5)
    expert = reference_probabilities(seeded_hub.expert_dirs[1], image, labels)
    assert {c["label"]: c["confidence"] for c in compared["confidences"]} == pytest.approx(
        {k: expert[k] for k in sorted(expert, key=expert.get, reverse=True)[:3]}, abs=1e-5
    )
    assert "alice/tiny-clip-expert-1" in caption
    # The merged model is not the expert: merging changed the prediction scores.
    assert compared["confidences"] != merged["confidences"]


def test_gradio_client_task_labels_and_errors(space_url, seeded_merged_repo):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(space_url, verbose=False)
    merged, compared, _ = client.predict(
        handle_file(str(EXAMPLE)), "", "mnist", 10, "none", api_name="/classify"
    )
    assert sorted(c["label"] for c in merged["confidences"]) == [str(d) for d in range(10)]
    assert sum(c["confidence"] for c in merged["confidences"]) == pytest.approx(1.0, abs=1e-4)
    assert not compared.get("confidences")
    with pytest.raises(AppError, match="Too many labels"):
        client.predict(handle_file(str(EXAMPLE)), ",".join(f"l{i}" for i in range(60)), "Free text", 3, "none",
                       api_name="/classify")


def test_insert_space_link_goes_under_the_title():
    card = "---\nlicense: mit\n---\n\n# my-model\n\nText.\n"
    linked = insert_space_link(card, "alice/demo", "http://hub/spaces/alice/demo")
    assert linked.startswith("---\nlicense: mit\n---\n\n# my-model\n\n**Try it in the Space:** [alice/demo](http://hub/spaces/alice/demo)\n")
    assert linked.endswith("Text.\n")


def test_cli_publish_creates_the_space_and_links_the_card(seeded_merged_repo, seeded_hub, hub_api, alice_token, capsys):
    space_id = "alice/tiny-merged-demo"
    code = cli_main(["space", "publish", seeded_merged_repo, "--space", space_id, "--token", alice_token, "-q"])
    assert code == 0
    url = capsys.readouterr().out.strip()
    assert url == f"{hub_api.endpoint}/spaces/{space_id}"

    files = set(hub_api.list_repo_files(space_id, repo_type="space"))
    assert {"README.md", "app.py", "requirements.txt", "space_config.json", "accuracy.png", "examples/synthetic-colors-0.png"} <= files
    assert "examples/red_square.png" not in files  # the merged tasks' own images replace the generic shapes
    folder = Path(snapshot_download(space_id, repo_type="space"))
    assert (folder / "app.py").read_bytes() == (space_app_dir() / "app.py").read_bytes()
    card = SpaceCard.load(folder / "README.md")
    import gradio

    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"
    assert card.data.sdk_version == gradio.__version__
    assert card.data.models[:2] == [seeded_merged_repo, seeded_hub.base]
    assert "hf-merge" in card.data.tags and card.data.title and card.data.emoji
    assert 0 < len(card.data.short_description) <= 60
    front_matter = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
    assert front_matter["colorFrom"] and front_matter["colorTo"]
    config = json.loads((folder / "space_config.json").read_text())
    assert config["model"] == seeded_merged_repo and config["base"]["repo_id"] == seeded_hub.base
    assert alice_token not in (folder / "space_config.json").read_text()

    model_card = Path(hub_api.hf_hub_download(seeded_merged_repo, "README.md")).read_text()
    assert f"[{space_id}]({url})" in model_card
    assert model_card.count(url) == 1
    commits = hub_api.list_repo_commits(seeded_merged_repo)
    assert commits[0].title == f"Link the Space {space_id}"

    # Publishing again updates the Space but does not link it twice.
    assert cli_main(["space", "publish", seeded_merged_repo, "--space", space_id, "--token", alice_token, "-q"]) == 0
    model_card = Path(hub_api.hf_hub_download(seeded_merged_repo, "README.md")).read_text()
    assert model_card.count(url) == 1


def test_cli_publish_errors(seeded_merged_repo, bob_token, tmp_path, capsys):
    assert cli_main(["space", "publish", str(tmp_path), "--token", bob_token]) == 2
    assert "local folder" in capsys.readouterr().err
    code = cli_main(["space", "publish", seeded_merged_repo, "--space", "alice/not-bobs", "--token", bob_token])
    err = capsys.readouterr().err
    assert code == 1 and "could not publish the Space alice/not-bobs" in err
    assert bob_token not in err
    code = cli_main(["space", "publish", "alice/does-not-exist", "--token", bob_token])
    assert code == 1 and "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_published_space_runs_as_is_without_hf_merge(seeded_merged_repo, hub_api, alice_token, tmp_path):
    """The Space repo, downloaded and started like the Hub does (``python app.py``), serves the model."""
    import os
    import subprocess
    import sys
    import time

    from gradio_client import Client, handle_file

    space_id = "alice/tiny-merged-as-is"
    cli_main(["space", "publish", seeded_merged_repo, "--space", space_id, "--token", alice_token, "-q", "--no-card-link"])
    folder = Path(snapshot_download(space_id, repo_type="space", local_dir=tmp_path / "space"))
    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", HF_HUB_OFFLINE="0")
    # Importing hf_merge fails in the child: the Space must not need the package.
    code = "import sys, runpy; sys.modules['hf_merge'] = None; runpy.run_path('app.py', run_name='__main__')"
    process = subprocess.Popen([sys.executable, "-c", code], cwd=folder, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(240):
            if process.poll() is not None:
                pytest.fail("the Space exited:\n" + process.stdout.read()[-3000:])
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.5)
        client = Client(url, verbose=False)
        merged, compared, caption = client.predict(
            handle_file(str(EXAMPLE)), "", "synthetic/colors", 3, "base", api_name="/classify"
        )
        classes = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black"]
        image = Image.open(EXAMPLE).convert("RGB")
        expected = reference_probabilities(snapshot_download(seeded_merged_repo), image, classes)
        assert {c["label"]: c["confidence"] for c in merged["confidences"]} == pytest.approx(
            {k: expected[k] for k in sorted(expected, key=expected.get, reverse=True)[:3]}, abs=1e-5
        )
        assert "alice/tiny-clip-base" in caption and len(compared["confidences"]) == 3
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_space_run_serves_a_local_folder(tiny_base, monkeypatch):
    import gradio

    launched = {}
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs, blocks=self))
    assert cli_main(["space", "run", str(tiny_base), "--host", "127.0.0.1", "--port", "7999", "-q"]) == 0
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7999
    assert launched["max_file_size"] == 10 * 1024 * 1024
    assert isinstance(launched["blocks"], gradio.Blocks)


def test_config_of_a_real_engine_merge(seeded_hub, tmp_path, app):
    """A folder written by the merge engine (OPCM over Hub repos) gives a Space with its lineage."""
    from hf_merge.merging.engine import merge_weights as merge

    result = merge(seeded_hub.base, seeded_hub.experts[:2], method="opcm", output_dir=tmp_path / "out")
    config = build_space_config(result.output_dir, keep_local_paths=True)
    assert config["method"] == "opcm"
    assert config["base"]["repo_id"] == seeded_hub.base
    assert config["base"]["commit_sha"] == seeded_hub.commits[seeded_hub.base]
    assert [(e["repo_id"], e["commit_sha"], e["step"]) for e in config["experts"]] == [
        (repo, seeded_hub.commits[repo], step) for step, repo in enumerate(seeded_hub.experts[:2], start=1)
    ]
    choices = dict((key, name) for name, key in app.comparison_choices(config))
    assert choices["base"] == f"Base: {seeded_hub.base}"
    assert choices["expert:1"] == f"Expert 2: {seeded_hub.experts[1]}"
    # The merged model loads and classifies in the app.
    scores = app.ZeroShotModel(str(result.output_dir)).classify(Image.open(EXAMPLE).convert("RGB"), ("a", "b"))
    assert sum(scores.values()) == pytest.approx(1.0)
