"""A shelf frame with each slot outlined and tinted by its compliance status, and a legend.

What an auditor looks at instead of a table: green is the right product, red another product,
amber a gap, grey a facing that could not be judged. A pure function of the frame, its planogram
and the verdicts (the demo writes one PNG per frame with it).
"""
from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from catalog.compliance import FacingStatus, FacingVerdict, summarise
from catalog.planogram import Planogram

COLOURS: dict[FacingStatus, tuple[int, int, int]] = {
    FacingStatus.OK: (46, 160, 67),
    FacingStatus.WRONG_PRODUCT: (220, 38, 38),
    FacingStatus.EMPTY: (245, 158, 11),
    FacingStatus.UNKNOWN: (128, 128, 128),
}
FILL_ALPHA = 70  # of 255: the products stay visible under the tint


def render_compliance(image: Image.Image, planogram: Planogram, verdicts: Sequence[FacingVerdict]) -> Image.Image:
    """A copy of ``image`` with every slot of ``planogram`` tinted and outlined by its verdict's
    status (matched by slot id; a slot without a verdict is drawn as unknown), and a legend strip
    below with the count per status and the compliance score."""
    by_slot = {v.slot_id: v for v in verdicts}
    width, height = image.size
    text_px = max(10, height // 60)
    font = ImageFont.load_default(size=text_px)
    base = image.convert("RGBA")
    tint = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(tint)
    line = max(2, min(width, height) // 200)
    for slot in planogram.slots:
        verdict = by_slot.get(slot.id)
        status = verdict.status if verdict is not None else FacingStatus.UNKNOWN
        colour = COLOURS[status]
        outline = [(x * width, y * height) for x, y in slot.region.quad()]
        draw.polygon(outline, fill=(*colour, FILL_ALPHA))
        draw.line([*outline, outline[0]], fill=(*colour, 255), width=line)
        label = f"{slot.id} {status.value}"
        if verdict is not None and status is FacingStatus.WRONG_PRODUCT and verdict.seen:
            label += f": {verdict.seen}"
        x, y = outline[0]
        box = draw.textbbox((x + line, y + line), label, font=font)
        draw.rectangle(box, fill=(0, 0, 0, 160))
        draw.text((x + line, y + line), label, fill=(255, 255, 255, 255), font=font)
    framed = Image.alpha_composite(base, tint).convert("RGB")

    summary = summarise([by_slot[s.id] for s in planogram.slots if s.id in by_slot], planogram.version)
    strip_h = text_px * 2 + 8
    out = Image.new("RGB", (width, height + strip_h), (255, 255, 255))
    out.paste(framed, (0, 0))
    legend = ImageDraw.Draw(out)
    x = 8.0
    y = height + (strip_h - text_px) / 2
    for status, colour in COLOURS.items():
        legend.rectangle((x, y, x + text_px, y + text_px), fill=colour)
        text = f"{status.value} {summary.counts[status.value]}"
        legend.text((x + text_px + 6, y), text, fill=(0, 0, 0), font=font)
        x += text_px + 6 + legend.textlength(text, font=font) + 24
    score = "n/a" if summary.compliance is None else f"{100 * summary.compliance:.0f}%"
    legend.text((x, y), f"compliance {score}   planogram {planogram.camera_id}@{planogram.version}",
                fill=(0, 0, 0), font=font)
    return out
