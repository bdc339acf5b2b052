"""One list of sections rendered as Markdown and as self-contained HTML, so both show the same numbers."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Section:
    title: str
    text: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    images: dict[str, str] = field(default_factory=dict)  # caption -> base64 PNG
    code: str = ""


def fmt(value: Any) -> str:
    """How every number appears in both reports (tests compare these strings with metrics.json)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        if s.text:
            out += [s.text, ""]
        if s.headers:
            out.append("| " + " | ".join(s.headers) + " |")
            out.append("|" + "---|" * len(s.headers))
            out += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in s.rows]
            out.append("")
        if s.images:
            out += [f"- {caption} (plot in report.html)" for caption in s.images] + [""]
        if s.code:
            out += ["```yaml", s.code.rstrip(), "```", ""]
    return "\n".join(out)


_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
    "text-align:right}th{background:#eee}figure{display:inline-block;margin:0 1em 1em 0}"
    "pre{background:#f6f6f6;padding:1em;overflow:auto}"
)


def html_page(title: str, sections: list[Section]) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for s in sections:
        out.append(f"<h2>{e(s.title)}</h2>")
        if s.text:
            out.append(f"<p>{e(s.text)}</p>")
        if s.headers:
            out.append(
                "<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in s.headers) + "</tr></thead>"
            )
            body = ["<tr>" + "".join(f"<td>{e(fmt(v))}</td>" for v in row) + "</tr>" for row in s.rows]
            out.append("<tbody>" + "".join(body) + "</tbody></table>")
        for caption, png in s.images.items():
            out.append(
                f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{png}">'
                f"<figcaption>{e(caption)}</figcaption></figure>"
            )
        if s.code:
            out.append(f"<pre>{e(s.code)}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
