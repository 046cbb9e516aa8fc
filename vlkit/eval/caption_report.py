"""The captioning part of an evaluation report, and the written captions as a COCO results file.

The report shows the corpus scores, then two grids of the split's images (thumbnails decoded from the dataset):
the captions with the highest and the lowest CIDEr-D, each with the written caption, its CIDEr-D and
log-probability, and the human references. ``captions_results.json`` beside ``index.html`` holds every written
caption in the COCO results format that the official caption evaluation reads.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from PIL import Image

from vlkit.eval.evaluate import EvalResult
from vlkit.eval.thumbnails import split_thumbnails

EXAMPLES = 8  # images in each of the best and worst grids
THUMB_SIDE = 160
RESULTS_NAME = "captions_results.json"
METRIC_NAMES = (("BLEU-1", "bleu1"), ("BLEU-2", "bleu2"), ("BLEU-3", "bleu3"), ("BLEU-4", "bleu4"),
                ("METEOR", "meteor"), ("ROUGE-L", "rouge_l"), ("CIDEr-D", "cider"), ("SPICE", "spice"))

CSS = """
.caption-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 14px; }
.caption-card { border: 1px solid #e3e3e3; border-radius: 6px; padding: 10px; background: #fcfcfd; }
.caption-card img { width: 100%; max-width: 160px; display: block; margin: 0 auto 8px; image-rendering: auto; }
.caption-card .written { font-weight: 600; margin: 4px 0; } .caption-card .scores { color: #666; font-size: 13px; }
.caption-card ul { margin: 6px 0 0; padding-left: 18px; color: #444; font-size: 13px; }
"""


def coco_image_id(image_id: Any) -> Any:
    """The id as a COCO results file holds it: an integer when the dataset's id is a whole number
    (``"391895"`` -> ``391895``, as COCO's own ids are), otherwise the id as stored."""
    if isinstance(image_id, str) and image_id.isascii() and image_id.isdigit():
        return int(image_id)
    return image_id


def coco_results(result: EvalResult) -> list[dict[str, Any]]:
    """Every written caption of a captioning evaluation as ``[{"image_id": ..., "caption": ...}]``, in split order.

    Raises:
        VlkitError: two images share an id once converted (see :func:`coco_image_id`).
    """
    from vlkit.metrics.captioning import coco_results_json

    rows = result.captions or []
    return coco_results_json([coco_image_id(r["id"]) for r in rows], [r["caption"] for r in rows])


def _card(row: dict[str, Any], thumb: str) -> str:
    refs = "".join(f"<li>{html.escape(r)}</li>" for r in row["references"])
    return (f'<div class="caption-card"><img src="{thumb}" alt="{html.escape(str(row["id"]))}">'
            f'<p class="written">{html.escape(row["caption"] or "(empty)")}</p>'
            f'<p class="scores">CIDEr-D {row["cider"]:.1f} · score {row["score"]:.2f} · '
            f'<code>{html.escape(str(row["id"]))}</code></p><ul>{refs}</ul></div>')


def caption_body(result: EvalResult, out: Path, table) -> str:
    """The report's captioning section; writes the thumbnails under ``out/thumbs`` and the COCO results file.

    Args:
        result: a captioning :class:`EvalResult`.
        out: the report's (temporary) directory.
        table: the report's table helper, ``table(header, rows) -> html``.
    """
    d = result.details
    rows = [[label, f"{v:.2f}"] for label, key in METRIC_NAMES
            for v in [next((v for k, v in result.metrics.items() if k.endswith("/" + key)), None)] if v is not None]
    decoding = d.get("decoding") or {}
    parts = ["<h2>Captioning</h2>", table(["metric (times 100)", "value"], rows),
             f"<p>{d['images']} images captioned, {d['captioned_images']} scored against {d['references']} human "
             f"captions; {decoding.get('num_beams', 1)} beams, at most {decoding.get('max_new_tokens')} tokens"
             + (f", prompt <code>{html.escape(d['prompt'])}</code>" if d.get("prompt") else "")
             + f"; {html.escape(d['tokenizer'].upper())} tokens.</p>"]
    if d.get("note"):
        parts.append(f"<p>Note: {html.escape(d['note'])}.</p>")
    (out / RESULTS_NAME).write_text(json.dumps(coco_results(result), indent=1) + "\n")
    parts.append(f'<p>Every written caption, in the COCO results format: <a href="{RESULTS_NAME}">{RESULTS_NAME}</a>. '
                 "A caption's score is the decoder's log-probability of its tokens (per token under beam "
                 "search).</p>")
    scored = [r for r in (result.captions or []) if r.get("cider") is not None]
    by_cider = sorted(scored, key=lambda r: (-r["cider"], r["index"]))
    best = by_cider[:EXAMPLES]
    worst = [r for r in reversed(by_cider) if r not in best][:EXAMPLES]
    shown = sorted({r["index"] for r in best + worst})
    (out / "thumbs").mkdir(exist_ok=True)
    names = {}
    for index, pixels in zip(shown, split_thumbnails(result.dataset, result.split, shown, THUMB_SIDE)):
        names[index] = f"thumbs/{index}.jpg"
        Image.fromarray(pixels).save(out / names[index], quality=88)
    for title, group in (("Highest CIDEr-D", best), ("Lowest CIDEr-D", worst)):
        if group:
            cards = "".join(_card(r, names[r["index"]]) for r in group)
            parts.append(f'<h2>{title}</h2><div class="caption-grid">{cards}</div>')
    return "\n".join(parts)
