"""Strings from other people's repos reach the card and the Space inert: no live tag, link or table break."""

from __future__ import annotations

import html
import json
import re

import pytest
import yaml
from markdown_it import MarkdownIt

from hf_merge.evaluation import EvaluationReport
from hf_merge.io.merge_folder import MergeFolder
from hf_merge.merging.state import MergeState
from hf_merge.publish import escape
from hf_merge.publish.card import license_id, read_license, write_card
from hf_merge.publish.space import load_app_module, render_space_readme
from hf_merge.watch.ledger import Ledger

HOSTILE_LICENSE = "mit --><script>alert(1)</script>"
HOSTILE_NAME = "<img src=x onerror=alert(1)>"
HOSTILE_REPO = "evil/x) [click](javascript:alert(2)"
HOSTILE_TASK = "<iframe src=//evil>|x"
LIVE = re.compile(r"<(script|img|iframe)\b|href=\"javascript", re.IGNORECASE)


def rendered(markdown: str) -> str:
    """HTML as a CommonMark renderer that lets raw HTML through (as the Hub's does, before its sanitiser)."""
    return MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)


def hostile_folder(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    state = MergeState(
        method="average", hyperparameters={"<b>k</b>": "`v` <img src=y>"}, step=2,
        base={"repo_id": "org/base", "commit_sha": "f" * 40, "name": "org/base"},
        lineage=[{"name": HOSTILE_NAME, "path": "/tmp/x", "step": 1},
                 {"repo_id": HOSTILE_REPO, "commit_sha": "a" * 40, "name": HOSTILE_REPO, "step": 2}],
        merged_names=["vision_model.x"], from_base={"<script>t</script>": "kept: <img src=z>"},
    )
    state.save(tmp_path)
    (tmp_path / "recipe.yaml").write_text("base: org/base\nnote: |\n  ```\n  </code><script>alert(3)</script>\n")
    report = EvaluationReport(limit=4)
    report.add_step(1, {HOSTILE_TASK: {"accuracy": 0.5, "dataset": HOSTILE_TASK}}, [HOSTILE_TASK])
    report.add_step(2, {HOSTILE_TASK: {"accuracy": 0.25, "dataset": HOSTILE_TASK}}, [HOSTILE_TASK])
    report.to_json(tmp_path / "eval_results.json")
    ledger = Ledger()
    ledger.record("carol/x", "c" * 40, "refused", reason=f"license {HOSTILE_LICENSE!r} | <img src=w onerror=alert(4)>",
                  kind="license")
    ledger.save(tmp_path)
    return tmp_path


def test_hostile_card_strings_are_inert_and_the_front_matter_parses(tmp_path):
    expert = tmp_path / "expert"
    expert.mkdir()
    (expert / "README.md").write_text(f"---\nlicense: {json.dumps(HOSTILE_LICENSE)}\n---\n")
    folder = hostile_folder(tmp_path / "out")
    licenses = {"org/base": "mit", HOSTILE_NAME: read_license(expert), HOSTILE_REPO: HOSTILE_LICENSE}
    text = write_card(folder, repo_id="me/merged", licenses=licenses, plot=False).read_text()

    meta = yaml.safe_load(text.split("---\n", 2)[1])
    assert meta["license"] == "other"
    assert meta["base_model"] == ["org/base", HOSTILE_REPO]  # kept exact, as YAML data
    assert [r["dataset"]["name"] for r in meta["model-index"][0]["results"]] == [HOSTILE_TASK]
    html = rendered(text.split("---\n", 2)[2])
    assert not LIVE.search(html), LIVE.search(html)
    assert "&lt;img src=x onerror=alert(1)&gt;" in html  # shown, as text
    assert "&lt;iframe src=//evil&gt;|x" in html  # the task's pipe did not split the table
    assert "&lt;/code&gt;&lt;script&gt;alert(3)&lt;/script&gt;" in html  # the recipe stays in its code block
    assert "hf-merge parent licenses" not in text  # hidden state lives in merge_state.json, never in the card
    recorded = MergeFolder(folder).licenses()
    assert {name: license_id(value) for name, value in recorded.items()} == {
        "org/base": "mit", HOSTILE_NAME: "other", HOSTILE_REPO: "other"}


def test_a_regenerated_card_reads_its_escaped_licence_comment_back(tmp_path):
    folder = hostile_folder(tmp_path)
    write_card(folder, licenses={"org/base": "mit", HOSTILE_NAME: "mit", HOSTILE_REPO: "apache-2.0"}, plot=False)
    text = write_card(folder, licenses=None, plot=False).read_text()  # `hf-merge card DIR`
    assert "apache-2.0" in text.split("License check needed", 1)[1].split("\n", 1)[0]
    assert not LIVE.search(rendered(text.split("---\n", 2)[2]))


@pytest.mark.parametrize("value", [HOSTILE_LICENSE, HOSTILE_NAME, HOSTILE_REPO, HOSTILE_TASK, "a\nb\\c*d`e[f]g&h", "``x`"])
def test_the_escapers_round_trip_through_a_renderer(value):
    cell = rendered(f"| h |\n|---|\n| {escape.markdown_text(value)} |\n")
    assert cell.count("<td>") == 1 and not LIVE.search(cell)
    paragraph = MarkdownIt().render(escape.markdown_text(value)).strip()  # shown as the value itself
    assert paragraph.startswith("<p>") and html.unescape(paragraph[3:-4]) == escape.one_line(value)
    code = MarkdownIt().render(escape.code_span(value))
    assert code.count("<code>") == 1 and not LIVE.search(code)
    block = MarkdownIt().render(escape.code_block(value + "\n```\n<script>x</script>\n", "yaml") + "\nafter\n")
    assert block.count("<pre>") == 1 and "<p>after</p>" in block and not LIVE.search(block)
    assert json.loads(escape.comment_json({"v": value})) == {"v": value} and "-->" not in escape.comment_json({"v": value + "-->"})


def test_the_space_escapes_the_same_way_and_its_readme_is_inert(tmp_path):
    app = load_app_module()
    for value in [HOSTILE_LICENSE, HOSTILE_NAME, HOSTILE_REPO, HOSTILE_TASK, "a\tb\\c*d`e[f]g&h|"]:
        assert app.markdown_text(value) == escape.markdown_text(value)
    config = {"model": "me/merged", "method": "<script>m</script>", "title": HOSTILE_NAME,
              "base": {"name": HOSTILE_NAME, "commit_sha": "f" * 40},
              "experts": [{"name": HOSTILE_REPO, "repo_id": HOSTILE_REPO, "commit_sha": "a" * 40, "step": 1}],
              "accuracy": {"tasks": [HOSTILE_TASK], "rows": [{"step": 1, "accuracy": [0.5], "average": 0.5}]}}
    for markdown in (app.lineage_markdown(config), app.accuracy_markdown(config)):
        assert not LIVE.search(rendered(markdown))
    readme = render_space_readme(config, "me/merged-demo")
    assert yaml.safe_load(readme.split("---\n", 2)[1])["models"][-1] == HOSTILE_REPO
    assert not LIVE.search(rendered(readme.split("---\n", 2)[2]))
