"""`kdpipe report`: one self-contained HTML page to look at what the teacher and every trained model retrieve.

The page holds the metrics tables (metrics_detail.json, as metrics.md draws them: recalls, RSUM, its interval
against the baseline, seeds, RSUM per gallery, cost), the recall plots (plots/*.png), and for a sample of test
captions each model's top-5 images side by side, for a sample of test images each model's top captions.
Retrievals are computed here, ranked as evaluate ranks them (`evaluate.gallery`: with `by_directory` each query
only among its own gallery, pipeline/evaluate/galleries.py), and the samples are drawn from every gallery. The
caption's own image (a hit for the metrics) is framed in green; another image that carries the very same caption
text (in the demo, the other drawing of the same emoji), which the metrics do not count, in dashed green.
Thumbnails and plots are inlined as data URIs and a Content-Security-Policy forbids every fetch, so the file
opens offline, anywhere. Captions and image ids are untrusted text: everything goes through `html_text`
(control characters shown as escapes, then `html.escape`).
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.evaluate.galleries import GalleryMode, image_groups
from pipeline.evaluate.tables import html_tables, metrics_tables
from pipeline.printable import html_text
from pipeline.store.durable import write_text_durably
from pipeline.store.ownership import Output, claim, text_with

GENERATOR = '<meta name="generator" content="kdpipe report">'  # how a later report knows the page is its own
REPORT_FILE = Output("a report", recognise=text_with(GENERATOR))
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:20px 28px;color:#222}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 6px;border-bottom:1px solid #ddd}
p.note{color:#555;margin:4px 0 10px}
table.metrics{border-collapse:collapse;margin:10px 0}
table.metrics td,table.metrics th{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}
table.metrics th{white-space:normal;vertical-align:bottom}
table.metrics th:first-child,table.metrics td:first-child{text-align:left}
table.metrics tbody tr:nth-child(even){background:#f6f6f6}
img.plot{width:100%;max-width:1400px;display:block;margin:8px auto}
.q{margin:16px 0 4px;font-weight:600}.q .g{font-weight:400;color:#666}
.row{display:grid;grid-template-columns:repeat(auto-fit,minmax(230px,1fr));gap:6px 22px}
.model h4{margin:2px 0;font-size:13px}
.hits{display:grid;grid-template-columns:repeat(5,1fr);gap:4px}
figure{margin:0;text-align:center;font-size:11px;min-width:0}
figure img{box-sizing:border-box;border:3px solid transparent;display:block;width:100%;aspect-ratio:1;
object-fit:contain;image-rendering:pixelated;background:#fafafa}
figure.ok img{border-color:#1a9c3a}figure.same img{border:3px dashed #1a9c3a}
figure figcaption{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.irow{display:grid;grid-template-columns:130px repeat(auto-fit,minmax(220px,1fr));gap:6px 22px;margin:14px 0}
.irow figure img{width:120px;height:120px}.irow figcaption{white-space:normal;word-break:break-all}
.irow ol{margin:2px 0;padding-left:20px}li.ok{color:#1a9c3a;font-weight:600}li.same{color:#1a9c3a}"""


@dataclass(frozen=True)
class Ranking:
    """One model's embeddings of the same gallery: images [N, D], captions [M, D] (L2-normalized)."""

    name: str
    image_emb: np.ndarray
    text_emb: np.ndarray


@dataclass(frozen=True)
class ReportGallery:
    """The split the report shows: images (uint8 [N, H, W, 3]), ids [N], captions [M], text_image [M], and its
    galleries as evaluate forms them ({name: image rows})."""

    images: Any
    ids: list[str]
    captions: list[str]
    text_image: np.ndarray
    groups: dict[str, np.ndarray]

    @classmethod
    def of(cls, images: Any, ids: list[str], captions: list[str], text_image: Any, mode: GalleryMode) -> ReportGallery:
        return cls(images, list(ids), list(captions), np.asarray(text_image, np.int64), image_groups(ids, mode))

    def labels(self) -> list[str]:
        """[N] what a thumbnail says: the image's first caption, or its id where it has none."""
        out = list(self.ids)
        for text, row in reversed(list(zip(self.captions, self.text_image.tolist()))):
            out[row] = text
        return out

    def group_of_image(self) -> np.ndarray:
        """[N] index (into `groups`) of each image's gallery."""
        out = np.empty(len(self.ids), dtype=np.int64)
        for g, rows in enumerate(self.groups.values()):
            out[rows] = g
        return out


def thumbnail(image: np.ndarray, size: int = 96) -> str:
    """uint8 [H, W, 3] -> a PNG data URI of at most size x size pixels."""
    from PIL import Image

    img = Image.fromarray(np.asarray(image))
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def topk(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """Row indices [Q, k] of the highest dot products, best first (ties: lower index first)."""
    scores = queries.astype(np.float32) @ gallery.astype(np.float32).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def stratified_sample(groups: list[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """About n items drawn from every group alike (n / len(groups) each, at least one), sorted: a sample that shows
    each gallery, not only the largest."""
    per = max(1, -(-n // max(len(groups), 1)))
    picks = [rng.choice(g, size=min(per, len(g)), replace=False) for g in groups if len(g)]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)


def _same_text_images(gallery: ReportGallery) -> dict[str, set[int]]:
    """caption text -> every image that has a caption with exactly that text."""
    out: dict[str, set[int]] = {}
    for text, row in zip(gallery.captions, gallery.text_image.tolist()):
        out.setdefault(text, set()).add(row)
    return out


def _group_label(gallery: ReportGallery, name: str) -> str:
    return f' <span class="g">(gallery {html_text(name)})</span>' if len(gallery.groups) > 1 else ""


def caption_section(rankings: list[Ranking], gallery: ReportGallery, sample: np.ndarray, k: int = 5) -> str:
    """For each sampled caption: every model's top-k images of the caption's gallery, its own image framed green,
    other images with the same caption text dashed."""
    names = list(gallery.groups)
    group_of = gallery.group_of_image()
    same_text = _same_text_images(gallery)
    labels = gallery.labels()
    thumbs: dict[int, str] = {}
    parts = []
    for c in sample.tolist():
        own = int(gallery.text_image[c])
        g = int(group_of[own])
        rows = gallery.groups[names[g]]
        parts.append(
            f'<div class="q">&ldquo;{html_text(gallery.captions[c])}&rdquo;{_group_label(gallery, names[g])}</div>'
            '<div class="row">'
        )
        for r in rankings:
            figs = []
            for j in rows[topk(r.text_emb[c : c + 1], r.image_emb[rows], k)[0]].tolist():
                uri = thumbs.setdefault(j, thumbnail(gallery.images[j]))
                cls, mark = (' class="ok"', "&#10003; ") if j == own else ("", "")
                if j != own and j in same_text[gallery.captions[c]]:
                    cls, mark = ' class="same"', "= "
                name = html_text(gallery.ids[j])
                figs.append(
                    f'<figure{cls} title="{name}: {html_text(labels[j])}"><img src="{uri}" alt="{name}">'
                    f"<figcaption>{mark}{html_text(labels[j])}</figcaption></figure>"
                )
            parts.append(
                f'<div class="model"><h4>{html_text(r.name)}</h4><div class="hits">{"".join(figs)}</div></div>'
            )
        parts.append("</div>")
    return "".join(parts)


def image_section(rankings: list[Ranking], gallery: ReportGallery, sample: np.ndarray, k: int = 3) -> str:
    """For each sampled image: every model's top-k captions of its gallery, its own captions in green, the same
    texts on other images in light green."""
    names = list(gallery.groups)
    group_of = gallery.group_of_image()
    caption_group = group_of[gallery.text_image]
    parts = []
    for i in sample.tolist():
        g = int(group_of[i])
        caps = np.flatnonzero(caption_group == g)
        own_texts = {gallery.captions[c] for c in np.flatnonzero(gallery.text_image == i).tolist()}
        name = html_text(gallery.ids[i])
        parts.append(
            f'<div class="irow"><figure title="{name}"><img src="{thumbnail(gallery.images[i], 120)}" alt="{name}">'
            f"<figcaption>{html_text(gallery.ids[i])}<br>{_group_label(gallery, names[g])}</figcaption></figure>"
        )
        for r in rankings:
            items = []
            for c in caps[topk(r.image_emb[i : i + 1], r.text_emb[caps], k)[0]].tolist():
                text = html_text(gallery.captions[c])
                if int(gallery.text_image[c]) == i:
                    items.append(f'<li class="ok">&#10003; {text}</li>')
                elif gallery.captions[c] in own_texts:
                    items.append(f'<li class="same">= {text}</li>')
                else:
                    items.append(f"<li>{text}</li>")
            parts.append(f'<div class="model"><h4>{html_text(r.name)}</h4><ol>{"".join(items)}</ol></div>')
        parts.append("</div>")
    return "".join(parts)


def render_report(
    rankings: list[Ranking],
    gallery: ReportGallery,
    *,
    metrics: dict | None,
    run_info: dict | None,
    plots: list[Path],
    title: str,
    models: dict[str, str] | None = None,
    n_captions: int = 8,
    n_images: int = 4,
    seed: int = 0,
) -> str:
    """The whole page as a string (deterministic for a given seed). `models`: {name: where it came from}."""
    if not rankings:
        raise InputError("report: no model to show")
    rng = np.random.default_rng(seed)
    group_rows = list(gallery.groups.values())
    group_caps = [np.flatnonzero(np.isin(gallery.text_image, rows)) for rows in group_rows]
    cap_sample = stratified_sample(group_caps, n_captions, rng)
    img_sample = stratified_sample(group_rows, n_images, rng)
    plot_html = "".join(f'<img class="plot" src="{png_uri(p)}" alt="{html_text(p.name)}">' for p in plots)
    shown = ", ".join(
        html_text(r.name) + (f" ({html_text(models[r.name])})" if models and r.name in models else "") for r in rankings
    )
    grouped = len(gallery.groups) > 1
    where = (
        f"Each query is ranked within its own gallery ({', '.join(html_text(g) for g in gallery.groups)}), as "
        "the metrics are (evaluate.gallery: by_directory)."
        if grouped
        else "Each query is ranked over the whole split, as the metrics are."
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{GENERATOR}'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html_text(title)}</title><style>{STYLE}</style></head><body>"
        f'<h1>{html_text(title)}</h1><p class="note">Models: {shown}.</p>'
        "<h2>Recall</h2>"
        + (
            html_tables(metrics_tables(metrics, run_info))
            if metrics and "n_images" in metrics
            else "<p>No metrics_detail.json of this kdpipe's layout (run kdpipe evaluate).</p>"
        )
        + plot_html
        + "<h2>Text to image: each model's top 5</h2>"
        f'<p class="note">{where} Framed green with &#10003;: the caption\'s own image (a hit). Dashed with =: '
        "another image with the very same caption text, which the metrics do not count.</p>"
        + caption_section(rankings, gallery, cap_sample)
        + "<h2>Image to text: each model's top 3 captions</h2>"
        f'<p class="note">{where} Green with &#10003;: the image\'s own captions; with =: the same text, '
        "captioning another image.</p>" + image_section(rankings, gallery, img_sample) + "</body></html>\n"
    )


def read_json(path: Path | None) -> dict | None:
    """A JSON object from `path`; None when there is no such file; one line when it is not a JSON object."""
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def run_report(
    workdir: Path,
    out: Path,
    *,
    split: str,
    models: dict[str, Path],
    features: Path,
    metrics: Path,
    run_info: Path,
    plots: Path,
    gallery_mode: GalleryMode = "split",
    n_captions: int = 8,
    n_images: int = 4,
    seed: int = 0,
) -> tuple[Path, list[str]]:
    """Compute the teacher's and every existing model directory's retrievals and write the page to `out`.
    Returns the path and the names of the models shown (a missing model directory is skipped, not an error)."""
    from pipeline.paths import ArtifactPaths
    from pipeline.search.gallery import embed_images, embed_texts, split_gallery
    from pipeline.store.features import open_store
    from pipeline.towers.student import load_student

    claim(out, REPORT_FILE)  # before the work: a file that is not an earlier report is refused
    split_view = split_gallery(ArtifactPaths(workdir), split)
    teacher = open_store(features).split(split)
    if list(teacher.image_id) != split_view.ids or not np.array_equal(teacher.text_image, split_view.text_image):
        raise InputError(f"{features}: split {split} is not the image cache's split in the same order; rerun extract")
    gallery = ReportGallery.of(
        split_view.images, split_view.ids, split_view.captions, split_view.text_image, gallery_mode
    )
    rankings = [Ranking("teacher", np.asarray(teacher.image_emb, np.float32), np.asarray(teacher.text_emb, np.float32))]
    sources = {"teacher": str(features)}
    for name, directory in models.items():
        if not (directory / "student_config.json").is_file():
            continue
        model = load_student(directory)
        images = embed_images(model, gallery.images, label=f"report: {name} images")
        rankings.append(Ranking(name, images, embed_texts(model, gallery.captions)))
        sources[name] = str(directory)
    page = render_report(
        rankings,
        gallery,
        metrics=read_json(metrics),
        run_info=read_json(run_info),
        plots=sorted(plots.glob("*.png")) if plots.is_dir() else [],
        title=f"kdpipe: {workdir.name} {split}",
        models=sources,
        n_captions=n_captions,
        n_images=n_images,
        seed=seed,
    )
    write_text_durably(out, page, REPORT_FILE)
    return out, [r.name for r in rankings]
