"""The tables of the metrics record (metrics_detail.json), for metrics.md (Markdown) and the report (HTML).

One model per row: R@1/5/10 both ways, RSUM, average, the RSUM difference to the reference with its paired-bootstrap
95% interval, seeds (RSUM sd); RSUM per gallery when the galleries are grouped; parameters and latency when
measured. `metrics_tables` lays them out once, as text cells; `markdown` and `html_tables` only draw them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.printable import html_text

TABLE_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "average_score")
RECALL_HEADER = ("model", "i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10", "RSUM", "average")


def model_names(doc: dict[str, Any]) -> list[str]:
    """The models of a metrics document, in its order (teacher, the trained ones, chance)."""
    return [k for k, v in doc.items() if isinstance(v, dict) and "rsum" in v]


@dataclass(frozen=True)
class Table:
    header: list[str]  # the first column holds names (left-aligned), the others figures (right-aligned)
    rows: list[list[str]]


def metrics_tables(doc: dict[str, Any], run_info: dict[str, Any] | None = None) -> list[str | Table]:
    """The record `doc` (metrics_detail.json) and how it was measured (`run_info`) as paragraphs and tables."""
    run_info = run_info or {}
    models = model_names(doc)
    ref = (run_info.get("bootstrap") or {}).get("reference")
    where = (
        f"{doc['dataset']}, {doc['split']} split: {doc['n_images']:,} images, {doc['n_captions']:,} captions "
        f"(exact search, float32 scores, {run_info.get('tie_rule', 'pessimistic')} ties"
        + (", per-group galleries" if run_info.get("gallery") == "by_directory" else "")
        + ")"
    )
    header = [*RECALL_HEADER, f"RSUM - {ref or 'reference'} (95% CI)", "seeds (RSUM sd)"]
    rows = []
    for m in models:
        r = doc[m]
        iv = r.get(f"rsum_vs_{ref}")
        diff = f"{iv['diff']:+.1f} ({iv['low']:+.1f} .. {iv['high']:+.1f})" if iv else "-"
        n_runs = len((run_info.get("runs") or {}).get(m, [m]))
        seeds = f"{n_runs} ({r['rsum_sd']:.1f})" if "rsum_sd" in r else ("-" if m == "chance" else str(n_runs))
        rows.append([m, *(f"{r[k]:.1f}" for k in TABLE_KEYS), diff, seeds])
    return [where, Table(header, rows), *_group_table(doc, models), *_cost_table(doc, models, run_info)]


def _group_table(doc: dict[str, Any], models: list[str]) -> list[Table]:
    groups = list(doc[models[0]].get("groups", {})) if models else []
    if not groups:
        return []
    rows = [[m, *(f"{doc[m]['groups'][g]['rsum']:.1f}" for g in groups)] for m in models]
    return [Table(["RSUM per gallery", *groups], rows)]


def _cost_table(doc: dict[str, Any], models: list[str], run_info: dict[str, Any]) -> list[str | Table]:
    lat, params = doc.get("latency"), doc.get("params") or {}
    if not lat and not any(v is not None for v in params.values()):
        return []
    rows = []
    for m in (m for m in models if m != "chance"):
        t = (lat or {}).get(m)
        rows.append([m, _count(params.get(m)), _sec(t, "image_s"), _sec(t, "caption_s")])
    out: list[str | Table] = [Table(["model", "parameters", "s / image", "s / caption"], rows)]
    method = run_info.get("latency_method") or {}
    if lat and method:
        note = f"latency on {method['device']}, {method['dtype']}, batch {method['batch_size']}"
        if lat.get("teacher") is None and method.get("teacher_reason"):
            note += f"; teacher not timed: {method['teacher_reason']}"
        for m, s in (lat.get("speedup") or {}).items():
            note += f"; {m} speed-up {s['image_s']:.3g}x per image, {s['caption_s']:.3g}x per caption"
        out.append(note)
    return out


def _count(p: int | None) -> str:
    if p is None:
        return "-"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if p >= scale:
            return f"{p / scale:.1f}{suffix}"
    return str(p)


def _sec(t: dict | None, key: str) -> str:
    return "-" if not t else f"{t[key]:.4g}"


def markdown(blocks: list[str | Table]) -> str:
    """Paragraphs and GitHub tables, a blank line between them."""
    parts = []
    for b in blocks:
        if isinstance(b, str):
            parts.append(b)
            continue
        lines = ["| " + " | ".join(b.header) + " |", "|---|" + "---:|" * (len(b.header) - 1)]
        lines += ["| " + " | ".join(row) + " |" for row in b.rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def markdown_table(doc: dict[str, Any], run_info: dict[str, Any] | None = None) -> str:
    """metrics.md."""
    return markdown(metrics_tables(doc, run_info))


def html_tables(blocks: list[str | Table]) -> str:
    """The same blocks as HTML (every text escaped): paragraphs and tables, figures right-aligned."""
    parts = []
    for b in blocks:
        if isinstance(b, str):
            parts.append(f"<p>{html_text(b)}</p>")
            continue
        head = "".join(f"<th>{html_text(h)}</th>" for h in b.header)
        body = "".join("<tr>" + "".join(f"<td>{html_text(c)}</td>" for c in row) + "</tr>" for row in b.rows)
        parts.append(f'<table class="metrics"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')
    return "".join(parts)


__all__ = ["Table", "TABLE_KEYS", "model_names", "metrics_tables", "markdown", "markdown_table", "html_tables"]
