"""docs/web-demo.png for the README: the laptop and the phone of the browser test, side by side.

Run after the browser test (tests/web/test_browser.py) saved its screenshots:
`.venv/bin/python web/scripts/demo_image.py`.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
from PIL import Image, ImageDraw, ImageFont

WEB = Path(__file__).resolve().parent.parent
ARTIFACTS = WEB / "e2e" / "artifacts"
OUT = WEB.parent / "docs" / "web-demo.png"
SHOTS = [("laptop", "08-laptop-after-catch-up.png"), ("phone", "08-phone-caught-up.png")]
FONT = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


def main() -> None:
    images = [(name, Image.open(ARTIFACTS / file).convert("RGB")) for name, file in SHOTS]
    pad, label = 24, 30
    width = sum(img.width for _, img in images) + pad * (len(images) + 1)
    height = max(img.height for _, img in images) + 2 * pad + label
    out = Image.new("RGB", (width, height), (226, 232, 240))
    draw = ImageDraw.Draw(out)
    font = ImageFont.truetype(str(FONT), 16)
    x = pad
    for name, img in images:
        draw.text((x + 2, pad), name, fill=(30, 41, 59), font=font)
        out.paste(img, (x, pad + label))
        x += img.width + pad
    OUT.parent.mkdir(exist_ok=True)
    out.save(OUT, optimize=True)
    print(f"{OUT} {out.size[0]}x{out.size[1]}")


if __name__ == "__main__":
    main()
