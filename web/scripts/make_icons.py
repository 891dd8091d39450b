"""Draw the PWA icons (committed PNGs; rerun only to change the design): `.venv/bin/python web/scripts/make_icons.py`.

Pillow comes with the dev venv (via matplotlib). Drawn at 4x and downsampled, so edges are smooth.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent.parent / "public" / "icons"
BACKGROUND = (49, 46, 129)  # indigo-900
ACCENT = (129, 140, 248)  # indigo-400
WHITE = (255, 255, 255)


def draw(size: int, *, maskable: bool) -> Image.Image:
    """Two linked device dots and a check mark: one session, several devices, in sync."""
    scale = 4
    s = size * scale
    image = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(image)
    if maskable:  # full bleed: the platform applies its own mask; keep the drawing in the 80 % safe zone
        d.rectangle((0, 0, s, s), fill=BACKGROUND)
        inset = s * 0.2
    else:
        d.rounded_rectangle((0, 0, s - 1, s - 1), radius=s * 0.22, fill=BACKGROUND)
        inset = s * 0.12
    box = s - 2 * inset

    def at(x: float, y: float) -> tuple[float, float]:
        return inset + x * box, inset + y * box

    r = box * 0.11
    left, right = at(0.2, 0.28), at(0.8, 0.28)
    d.line((left, right), fill=ACCENT, width=int(box * 0.05))
    for cx, cy in (left, right):
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=ACCENT)
    d.line((at(0.22, 0.66), at(0.42, 0.84), at(0.8, 0.5)), fill=WHITE, width=int(box * 0.1), joint="curve")
    return image.resize((size, size), Image.Resampling.LANCZOS)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, size, maskable in [
        ("icon-192.png", 192, False),
        ("icon-512.png", 512, False),
        ("maskable-512.png", 512, True),
        ("apple-touch-icon.png", 180, True),
        ("favicon-32.png", 32, False),
    ]:
        draw(size, maskable=maskable).save(OUT / name, optimize=True)
        print(OUT / name)


if __name__ == "__main__":
    main()
