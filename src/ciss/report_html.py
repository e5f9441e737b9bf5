"""Markdown of a report (headings, tables, images, paragraphs) as one self-contained HTML page."""

from __future__ import annotations

import base64
import html
from pathlib import Path


def to_html(md_text: str, out_dir: Path) -> str:
    """A minimal Markdown (headings, tables, images, paragraphs) to one self-contained HTML page."""
    body, table = [], []

    def flush() -> None:
        if table:
            rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in table if not set(ln) <= set("|-: ")]
            head, rest = rows[0], rows[1:]
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest)
                        + "</table>")
            table.clear()

    for ln in md_text.splitlines():
        if ln.startswith("|"):
            table.append(ln)
            continue
        flush()
        if ln.startswith("#"):
            level = len(ln) - len(ln.lstrip("#"))
            body.append(f"<h{level}>{html.escape(ln.lstrip('#').strip())}</h{level}>")
        elif ln.startswith("!["):
            alt, src = ln[2:].split("](", 1)
            data = base64.b64encode((out_dir / src.rstrip(")")).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
        elif ln.strip():
            body.append(f"<p>{html.escape(ln)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    # Marks every figure that decoded (data-shown), so a headless browser's DOM dump can prove it.
    check = ("<script>addEventListener('load',()=>{for(const i of document.images)"
             "i.dataset.shown=String(i.complete&&i.naturalWidth>0)})</script>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>ciss report</title>"
            f"<style>{style}</style>{check}</head><body>{''.join(body)}</body></html>")
