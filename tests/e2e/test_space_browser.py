"""The Space in a real headless Chromium: upload, labels, predictions equal to the model's own."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import snapshot_download
from PIL import Image

from hf_merge.resources import space_app_dir

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EXAMPLE = space_app_dir() / "examples" / "green_triangle.png"
LABELS = ["green triangle", "red square", "blue circle", "yellow star", "a photo of ünïcode 😀"]




def _reference(folder, labels: list[str]) -> dict[str, float]:
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    image = Image.open(EXAMPLE).convert("RGB")
    inputs = processor(text=[f"a photo of a {label}." for label in labels], images=image, return_tensors="pt", padding=True)
    with torch.no_grad():
        return dict(zip(labels, model(**inputs).logits_per_image.softmax(-1)[0].tolist(), strict=False))


def _read_label(page, element_id: str) -> dict[str, float]:
    """Each bar of a gr.Label is a <meter> carrying the exact confidence in its value."""
    meters = page.locator(f"#{element_id} meter")
    return {meters.nth(i).get_attribute("aria-label"): float(meters.nth(i).get_attribute("value")) for i in range(meters.count())}




@pytest.fixture(scope="module")
def page(space_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(space_url)
        page.wait_for_selector("#classify")
        yield page
        browser.close()


def test_browser_predictions_equal_the_models(page, seeded_merged_repo, seeded_hub, tmp_path):
    page.set_input_files("#image input[type=file]", str(EXAMPLE))
    page.wait_for_selector("#image img")
    page.fill("#labels textarea", ", ".join(LABELS))
    page.locator("#top_k input[type=number]").fill("5")
    page.click("#classify")
    page.wait_for_selector("#merged_output meter")
    page.wait_for_selector("#compare_output meter")

    merged = _read_label(page, "merged_output")
    expected = _reference(snapshot_download(seeded_merged_repo), LABELS)
    assert merged.keys() == expected.keys()
    assert merged == pytest.approx(expected, abs=1e-6)
    top = max(expected, key=expected.get)
    assert page.inner_text("#merged_output h2") == top

    # Side by side: the base model's own prediction for the same inputs.
    base = _read_label(page, "compare_output")
    assert base == pytest.approx(_reference(seeded_hub.base_dir, LABELS), abs=1e-6)
    assert "Base: alice/tiny-clip-base" in page.inner_text("#compare_caption")

    screenshot = tmp_path / "space.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000


def test_browser_refuses_too_many_labels(page):
    page.set_input_files("#image input[type=file]", str(EXAMPLE))
    page.fill("#labels textarea", ",".join(f"label {i}" for i in range(80)))
    page.click("#classify")
    toast = page.get_by_text("Too many labels: 80 (at most 50).")
    toast.first.wait_for()
    assert toast.count() >= 1


def test_browser_merge_steps_tab(page, tmp_path):
    page.get_by_role("tab", name="Merge steps").click()
    table = page.locator("#accuracy_table")
    table.wait_for()
    text = table.inner_text()
    for task in ("synthetic/colors", "mnist", "eurosat", "average"):
        assert task in text
    assert "90.0" in text  # step 1 on its own task, from eval_results.json
    assert page.locator("img[alt], img").count() >= 1
    page.screenshot(path=str(tmp_path / "merge-steps.png"), full_page=True)
