"""`kdpipe report`: one self-contained HTML page to look at what teacher, student and baseline retrieve.

The page holds the recall table (metrics.json), the recall plots (plots/*.png), and for a sample of test
captions each model's top-5 images side by side (the correct image framed), and for a sample of test images
each model's top captions. Retrievals are computed here: the teacher's from the feature store, the students'
by encoding the image cache and the captions with the saved models. Thumbnails and plots are inlined as
data URIs and a Content-Security-Policy forbids every fetch, so the file opens offline, anywhere. Captions
and image ids are untrusted text: everything goes through `html.escape`.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from pipeline.store.durable import write_text_durably
from pipeline.store.ownership import Output, claim, text_with

GENERATOR = '<meta name="generator" content="kdpipe report">'  # how a later report knows the page is its own
REPORT_FILE = Output("a report", recognise=text_with(GENERATOR))
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """body{font:14px system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th:first-child,td:first-child{text-align:left}
.q{margin:18px 0 6px;font-weight:600}.row{display:flex;gap:18px;flex-wrap:wrap}.model{min-width:200px}
.model h4{margin:4px 0}.hits{display:flex;gap:4px}figure{margin:0;text-align:center;font-size:11px}
figure img{border:3px solid transparent;display:block;width:60px;height:60px;object-fit:cover;image-rendering:pixelated}figure.ok img{border-color:#1a9c3a}
figure figcaption{max-width:66px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
li.ok{color:#1a9c3a;font-weight:600}img.plot{max-width:640px}"""


@dataclass(frozen=True)
class Ranking:
    """One model's embeddings of the same gallery: images [N, D], captions [M, D] (L2-normalized)."""

    name: str
    image_emb: np.ndarray
    text_emb: np.ndarray


def thumbnail(image: np.ndarray, size: int = 72) -> str:
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


def recall_table(metrics: dict) -> str:
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    rows = [(name, v) for name, v in metrics.items() if isinstance(v, dict) and "rsum" in v]
    if not rows:
        return "<p>metrics.json holds no model results.</p>"
    head = "<tr><th>model</th>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>"
    body = "".join(
        f"<tr><td>{html.escape(str(name))}</td>"
        + "".join(f"<td>{float(v[k]):.2f}</td>" if isinstance(v.get(k), int | float) else "<td>-</td>" for k in keys)
        + "</tr>"
        for name, v in rows
    )
    where = html.escape(f"{metrics.get('dataset', '?')} / {metrics.get('split', '?')}")
    return f"<p>{where}: recalls in percent</p><table>{head}{body}</table>"


def caption_section(
    rankings: list[Ranking],
    images: np.ndarray,
    ids: list[str],
    captions: list[str],
    text_image: np.ndarray,
    sample: np.ndarray,
    k: int = 5,
) -> str:
    """For each sampled caption: every model's top-k images, the caption's own image framed green."""
    tops = {r.name: topk(r.text_emb[sample], r.image_emb, k) for r in rankings}
    thumbs: dict[int, str] = {}
    parts = []
    for qi, c in enumerate(sample.tolist()):
        parts.append(f'<div class="q">&ldquo;{html.escape(captions[c])}&rdquo;</div><div class="row">')
        for r in rankings:
            figs = []
            for j in tops[r.name][qi].tolist():
                uri = thumbs.setdefault(j, thumbnail(images[j]))
                ok = ' class="ok"' if j == int(text_image[c]) else ""
                mark = "&#10003; " if ok else ""
                figs.append(
                    f'<figure{ok}><img src="{uri}" alt="{html.escape(ids[j], quote=True)}">'
                    f"<figcaption>{mark}{html.escape(ids[j])}</figcaption></figure>"
                )
            parts.append(
                f'<div class="model"><h4>{html.escape(r.name)}</h4><div class="hits">{"".join(figs)}</div></div>'
            )
        parts.append("</div>")
    return "".join(parts)


def image_section(
    rankings: list[Ranking],
    images: np.ndarray,
    ids: list[str],
    captions: list[str],
    text_image: np.ndarray,
    sample: np.ndarray,
    k: int = 3,
) -> str:
    """For each sampled image: every model's top-k captions, the image's own captions in green."""
    tops = {r.name: topk(r.image_emb[sample], r.text_emb, k) for r in rankings}
    parts = []
    for qi, i in enumerate(sample.tolist()):
        parts.append(
            f'<div class="row"><figure><img src="{thumbnail(images[i], 112)}" '
            f'alt="{html.escape(ids[i], quote=True)}"><figcaption>{html.escape(ids[i])}</figcaption></figure>'
        )
        for r in rankings:
            items = "".join(
                f'<li class="ok">&#10003; {html.escape(captions[c])}</li>'
                if int(text_image[c]) == i
                else f"<li>{html.escape(captions[c])}</li>"
                for c in tops[r.name][qi].tolist()
            )
            parts.append(f'<div class="model"><h4>{html.escape(r.name)}</h4><ol>{items}</ol></div>')
        parts.append("</div>")
    return "".join(parts)


def render_report(
    rankings: list[Ranking],
    images: np.ndarray,
    ids: list[str],
    captions: list[str],
    text_image: np.ndarray,
    *,
    metrics: dict | None,
    plots: list[Path],
    title: str,
    n_captions: int = 8,
    n_images: int = 4,
    seed: int = 0,
) -> str:
    """The whole page as a string (deterministic for a given seed)."""
    if not rankings:
        raise InputError("report: no model to show")
    rng = np.random.default_rng(seed)
    cap_sample = np.sort(rng.choice(len(captions), size=min(n_captions, len(captions)), replace=False))
    img_sample = np.sort(rng.choice(len(ids), size=min(n_images, len(ids)), replace=False))
    plot_html = "".join(f'<img class="plot" src="{png_uri(p)}" alt="{html.escape(p.name, quote=True)}">' for p in plots)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{GENERATOR}'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        "<h2>Recall</h2>"
        + (recall_table(metrics) if metrics else "<p>No metrics.json (run kdpipe evaluate).</p>")
        + plot_html
        + f"<h2>Text to image: top-5 of {', '.join(html.escape(r.name) for r in rankings)}</h2>"
        "<p>The caption's own image is framed in green.</p>"
        + caption_section(rankings, images, ids, captions, text_image, cap_sample)
        + "<h2>Image to text: top-3 captions</h2><p>The image's own captions are green.</p>"
        + image_section(rankings, images, ids, captions, text_image, img_sample)
        + "</body></html>\n"
    )


def read_metrics(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    return data if isinstance(data, dict) else None


def run_report(
    workdir: Path,
    out: Path,
    *,
    split: str,
    models: dict[str, Path],
    features: Path,
    metrics: Path,
    plots: Path,
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
    gallery = split_gallery(ArtifactPaths(workdir), split)
    teacher = open_store(features).split(split)
    if list(teacher.image_id) != gallery.ids or not np.array_equal(teacher.text_image, gallery.text_image):
        raise InputError(f"{features}: split {split} is not the image cache's split in the same order; rerun extract")
    rankings = [Ranking("teacher", np.asarray(teacher.image_emb, np.float32), np.asarray(teacher.text_emb, np.float32))]
    for name, directory in models.items():
        if not (directory / "student_config.json").is_file():
            continue
        model = load_student(directory)
        rankings.append(
            Ranking(
                name,
                embed_images(model, gallery.images, label=f"report: {name} images"),
                embed_texts(model, gallery.captions),
            )
        )
    page = render_report(
        rankings,
        gallery.images,
        gallery.ids,
        gallery.captions,
        gallery.text_image,
        metrics=read_metrics(metrics),
        plots=sorted(plots.glob("*.png")) if plots.is_dir() else [],
        title=f"kdpipe: {workdir.name} {split}",
        n_captions=n_captions,
        n_images=n_images,
        seed=seed,
    )
    write_text_durably(out, page, REPORT_FILE)
    return out, [r.name for r in rankings]
