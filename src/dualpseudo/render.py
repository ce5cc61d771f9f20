"""Rendering a report's blocks as a self-contained HTML page and as Markdown with its figures (report.py builds
the blocks)."""
from __future__ import annotations

import base64
import html

Block = tuple  # ("h", level, text) | ("p" | "note" | "pre", text) | ("table", header, rows)
#                | ("img", name, png, caption) | ("gallery", [(name, png, caption), ...])


CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1f2328;
       max-width: 1100px; margin: 2em auto; padding: 0 1.5em; background: #fff; }
h1 { font-size: 1.7em; border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: .35em .8em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } tr:nth-child(even) td { background: #fbfcfd; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: .9em; margin-top: .3em; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 0 1.5em; }
.note { color: #6e7781; font-style: italic; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: 1em; overflow: auto; font-size: 13px;
      line-height: 1.4; max-height: 40em; }
"""


def to_html(blocks: list[Block], title: str) -> str:
    """A self-contained HTML page (figures embedded as base64 PNGs, no external resources)."""
    e = html.escape
    body = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            body.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif kind in ("p", "note"):
            body.append(f'<p class="{kind}">{e(b[1])}</p>')
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            body.append(_figure(*b[1:]))
        elif kind == "gallery":
            body.append('<div class="gallery">' + "".join(_figure(*g) for g in b[1]) + "</div>")
        elif kind == "pre":
            body.append(f"<pre>{e(b[1])}</pre>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{e(title)} - dualpseudo report</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _figure(name: str, png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def to_markdown(blocks: list[Block], figures_dir: str) -> tuple[str, dict[str, bytes]]:
    """Markdown text and the figures it references ({file name under `figures_dir`, a relative POSIX path: PNG
    bytes})."""
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines, figures = [], {}
    for b in blocks:
        kind = b[0]
        if kind == "h":
            lines += ["#" * b[1] + " " + b[2], ""]
        elif kind == "p":
            lines += [b[1], ""]
        elif kind == "note":
            lines += [f"*{b[1]}*", ""]
        elif kind == "table":
            lines.append("| " + " | ".join(cell(h) for h in b[1]) + " |")
            lines.append("|" + "---|" * len(b[1]))
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in b[2]]
            lines.append("")
        elif kind in ("img", "gallery"):
            for name, png, caption in [b[1:]] if kind == "img" else b[1]:
                figures[name] = png
                lines += [f"![{cell(caption)}]({figures_dir}/{name})", ""]
        elif kind == "pre":
            fence = "````" if "```" in b[1] else "```"
            lines += [fence, b[1].rstrip("\n"), fence, ""]
    return "\n".join(lines), figures
