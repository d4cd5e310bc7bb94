"""Draw the DiM pipeline figure (three stages, left to right) with Pillow only.

Usage: python misc/make_pipeline_figure.py [--out figs/pipeline.png]
"""
import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
W, H = 1600, 600
MARGIN, GAP, TOP, BOTTOM = 30, 70, 30, 510
BOX_W = (W - 2 * MARGIN - 2 * GAP) // 3
COLORS = ["#e8f0fe", "#fef3e0", "#e6f4ea"]  # box fill per stage

STAGES = [
    ("Stage 1: gen_condense.py",
     "Train a class-conditional GAN (WGAN-GP critic + auxiliary classifier) "
     "on the real training set",
     ["Inputs: real images + labels",
      "z = N(0, I) noise with a one-hot class code in its first entries"]),
    ("Stage 2: pool_match.py\n--match logit --match-aug",
     "Fine-tune G so that a random pool model (ConvNet-3, ResNet-10/18, "
     "ResNet-10/18-AP, drawn each epoch) gives the same logits on real and "
     "generated images (after the same augmentation)",
     ["Loss = GAN loss + 0.01 \u00b7\nmean((log softmax f(x_real)\n"
      "- log softmax f(G(z)))^2)"]),
    ("Stage 3: validate.py",
     "Train classifiers only on images G generates on the fly; "
     "test on the real test set",
     []),
]
CAPTION = "DiM stores the dataset in a generator instead of a few pixels per class."


def font(size):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()  # older Pillow: fixed small bitmap font


def wrap(draw, text, fnt, width):
    """Greedy word wrap by rendered pixel width; explicit newlines are kept."""
    lines = []
    for para in text.split("\n"):
        cur = ""
        for word in para.split(" "):
            trial = f"{cur} {word}" if cur else word
            if cur.strip() and draw.textlength(trial, font=fnt) > width:
                lines.append(cur)
                cur = word
            else:
                cur = trial
        lines.append(cur)
    return lines


def draw_block(draw, x, y, text, fnt, width, fill, spacing=6):
    """Draw wrapped text starting at (x, y); return the y below it."""
    for line in wrap(draw, text, fnt, width):
        draw.text((x, y), line, font=fnt, fill=fill)
        y += fnt.getbbox("Ag")[3] + spacing
    return y


def arrow(draw, x0, x1, y, color="#444444"):
    draw.line([(x0, y), (x1 - 14, y)], fill=color, width=5)
    draw.polygon([(x1, y), (x1 - 18, y - 11), (x1 - 18, y + 11)], fill=color)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "figs" / "pipeline.png")
    args = ap.parse_args()

    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    f_title, f_body, f_small = font(28), font(25), font(23)
    pad = 18
    inner = BOX_W - 2 * pad

    for i, (title, desc, notes) in enumerate(STAGES):
        x = MARGIN + i * (BOX_W + GAP)
        draw.rounded_rectangle([x, TOP, x + BOX_W, BOTTOM], radius=16,
                               fill=COLORS[i], outline="#333333", width=3)
        y = draw_block(draw, x + pad, TOP + pad, title, f_title, inner, "#111111")
        draw.line([(x + pad, y + 4), (x + BOX_W - pad, y + 4)], fill="#888888", width=2)
        y = draw_block(draw, x + pad, y + 18, desc, f_body, inner, "#222222")
        for note in notes:  # bullet drawn as a dot: the default font lacks U+2022
            y += 18
            cy = y + f_small.getbbox("A")[3] // 2 + 2
            draw.ellipse([x + pad, cy - 4, x + pad + 8, cy + 4], fill="#1a4d8f")
            y = draw_block(draw, x + pad + 18, y, note, f_small, inner - 18, "#1a4d8f")
        if i < len(STAGES) - 1:
            arrow(draw, x + BOX_W + 8, x + BOX_W + GAP - 8, (TOP + BOTTOM) // 2)

    f_cap = font(30)
    cw = draw.textlength(CAPTION, font=f_cap)
    draw.text(((W - cw) / 2, BOTTOM + (H - BOTTOM) / 2 - 17), CAPTION,
              font=f_cap, fill="#111111")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out)
    print(f"saved {args.out} ({W}x{H})")


if __name__ == "__main__":
    main()
