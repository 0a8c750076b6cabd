"""Contact sheets (PNG grids of captioned thumbnails, drawn with PIL) and the static HTML page around them.

A sheet is a list of rows, each a list of `Cell`s (image path, caption lines, highlighted or not). Thumbnails
keep the aspect ratio inside a square box. A file that is missing or cannot be decoded becomes a grey
placeholder showing its key, never an error: a report about a dataset must survive the dataset's defects.

`html_page` builds a self-contained page: inline CSS, no scripts, no external resources, every link relative to
the page's folder, so it opens straight from disk (and from a copied folder).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont

__all__ = ["Cell", "Raw", "thumbnail", "render_sheet", "rel_link", "table", "image_tag", "link", "html_page"]

PLACEHOLDER = (170, 170, 170)
BACKGROUND = (255, 255, 255)
HIGHLIGHT = (31, 119, 180)
TEXT = (20, 20, 20)


@dataclass
class Cell:
    path: str | None
    key: str
    lines: list[str] = field(default_factory=list)
    highlight: bool = False


def _font(size: int):
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text``, shortened in the middle to fit ``width``: a file name keeps its start (the folder or source) and
    its end (the number and extension), which is where names differ."""
    if draw.textlength(text, font=font) <= width:
        return text
    head, tail = text[:len(text) // 2], text[len(text) // 2:]
    while (head or tail) and draw.textlength(head + "..." + tail, font=font) > width:
        if len(head) > len(tail):
            head = head[:-1]
        else:
            tail = tail[1:]
    return head + "..." + tail


def thumbnail(path: str | None, key: str, size: int, max_pixels: int | None = None) -> tuple[Image.Image, bool]:
    """(size x size RGB image, True if the file was shown); a grey placeholder naming ``key`` otherwise."""
    from ..data.images import DEFAULT_MAX_PIXELS, BadImage, load_rgb

    box = Image.new("RGB", (size, size), BACKGROUND)
    try:
        if not path:
            raise FileNotFoundError(key)
        img = load_rgb(path, max_pixels or DEFAULT_MAX_PIXELS)
        # Fit the box both ways: small images are enlarged too, so every cell reads at the same scale.
        scale = size / max(img.width, img.height)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BICUBIC)
        box.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
        return box, True
    except (BadImage, OSError, ValueError):
        pass
    box.paste(PLACEHOLDER, (0, 0, size, size))
    draw = ImageDraw.Draw(box)
    font = _font(10)
    words = ["image not found"] + _wrap(draw, key, font, size - 8)
    y = 6
    for line in words[:8]:
        draw.text((4, y), line, fill=TEXT, font=font)
        y += 12
    return box, False


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, cur = [], ""
    for ch in text:
        if draw.textlength(cur + ch, font=font) > width:
            lines.append(cur)
            cur = ""
        cur += ch
    return lines + ([cur] if cur else [])


CAPTION_PX = 13  # >= 12 px on the page: a sheet is at most MAX_WIDTH wide, so the report never scales it down
MAX_WIDTH = 1050


def render_sheet(rows: Sequence[Sequence[Cell]], path: str | os.PathLike, thumb: int = 128,
                 title: str | None = None, max_pixels: int | None = None) -> dict:
    """Draw ``rows`` of cells into one PNG at ``path``; returns {"shown", "placeholders"} counts. A row wider than
    the page (`MAX_WIDTH`) wraps onto the next line, so the sheet is shown at its own size and its captions stay
    readable."""
    pad, line_h = 6, CAPTION_PX + 3
    per_line = max(1, MAX_WIDTH // (thumb + 2 * pad))
    rows = [row[i:i + per_line] for row in rows for i in range(0, max(1, len(row)), per_line)]
    n_lines = max((len(c.lines) + 1 for r in rows for c in r), default=1)
    cols = max((len(r) for r in rows), default=1)
    cell_w, cell_h = thumb + 2 * pad, thumb + 2 * pad + n_lines * line_h
    top = 26 if title else 0
    sheet = Image.new("RGB", (cols * cell_w, top + len(rows) * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font, title_font = _font(CAPTION_PX), _font(16)
    if title:
        draw.text((pad, 4), _fit(draw, title, title_font, sheet.width - 2 * pad), fill=TEXT, font=title_font)
    shown = placeholders = 0
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            x, y = c * cell_w + pad, top + r * cell_h + pad
            img, ok = thumbnail(cell.path, cell.key, thumb, max_pixels)
            shown += ok
            placeholders += not ok
            sheet.paste(img, (x, y))
            if cell.highlight:
                draw.rectangle((x - 3, y - 3, x + thumb + 2, y + thumb + 2), outline=HIGHLIGHT, width=3)
            for i, line in enumerate([cell.key, *cell.lines]):
                draw.text((x, y + thumb + 3 + i * line_h), _fit(draw, line, font, thumb), fill=TEXT, font=font)
    sheet.save(path, format="PNG")
    return {"shown": shown, "placeholders": placeholders}


def rel_link(target: str | None, page_dir: str | os.PathLike) -> str | None:
    """A relative URL from the page's folder to ``target`` when the file exists, else None."""
    if not target or not os.path.isfile(target):
        return None
    rel = os.path.relpath(os.path.abspath(target), os.path.abspath(page_dir))
    return quote(rel.replace(os.sep, "/"))


_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 13px; }
th { background: #f2f2f2; }
img.sheet { max-width: 100%; border: 1px solid #ddd; }
.muted { color: #777; }
section { margin-bottom: 2em; }
"""


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An HTML table; cells are escaped unless they are `Raw`."""
    def cell(v, tag):
        text = v.html if isinstance(v, Raw) else html.escape("" if v is None else str(v))
        return f"<{tag}>{text}</{tag}>"
    # a key-value table has no header: an empty header row would show as a blank bar
    head = "<tr>" + "".join(cell(h, "th") for h in header) + "</tr>" if any(header) else ""
    body = "".join("<tr>" + "".join(cell(v, "td") for v in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


@dataclass
class Raw:
    html: str


def html_page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A complete static page: ``sections`` are (heading, already-escaped HTML body)."""
    parts = [f"<section><h2>{html.escape(h)}</h2>{body}</section>" for h, body in sections]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>\n")


def image_tag(src: str, alt: str) -> str:
    return f'<img class="sheet" src="{html.escape(src, quote=True)}" alt="{html.escape(alt, quote=True)}">'


def link(href: str | None, text: str) -> Raw:
    if href is None:
        return Raw(f'<span class="muted">{html.escape(text)}</span>')
    return Raw(f'<a href="{href}">{html.escape(text)}</a>')
