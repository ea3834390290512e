"""Other codecs at 896 px, for docs/benchmarks.md section 2: could lossy WebP (which the
providers accept) or libjpeg-turbo reach lines 10x smaller than the notebook's at 35 dB?

Reads the exact 896-px references that `shotlabel-bench psnr --sweep --dump DIR` writes
(`reference-N.png`), encodes each with Pillow (libjpeg-turbo and libwebp), decodes it
again and prints one Markdown row per setting: mean bytes, PSNR over RGB (as the bench
reports it) and over luma (Y, where text lives), min and mean over the screenshots, and
the mean time of one encode (one thread, best of three).

    .venv/bin/python bench/codec_sweep.py DIR
"""

import glob
import io
import math
import os
import sys
import time

from PIL import Image, ImageChops, ImageStat


def psnr(a, b):
    """PSNR in dB over every channel of two same-sized images."""
    rms = ImageStat.Stat(ImageChops.difference(a, b)).rms
    mse = sum(r * r for r in rms) / len(rms)
    return 99.0 if mse == 0 else 10 * math.log10(255 * 255 / mse)


SETTINGS = [
    ("JPEG (libjpeg-turbo) q85 4:4:4", "JPEG", {"quality": 85, "subsampling": 0}),
    (
        "JPEG (libjpeg-turbo) q85 4:4:4 optimised Huffman tables",
        "JPEG",
        {"quality": 85, "subsampling": 0, "optimize": True},
    ),
    ("JPEG (libjpeg-turbo) q70 4:4:4", "JPEG", {"quality": 70, "subsampling": 0}),
    ("JPEG (libjpeg-turbo) q50 4:2:0", "JPEG", {"quality": 50, "subsampling": 2}),
] + [
    (f"WebP q{q}", "WEBP", {"quality": q, "method": 4})
    for q in (90, 80, 70, 60, 50, 30)
]


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    refs = sorted(glob.glob(os.path.join(sys.argv[1], "reference-*.png")))
    if not refs:
        sys.exit(f"no reference-*.png in {sys.argv[1]}: run psnr --sweep --dump first")
    images = [Image.open(path).convert("RGB") for path in refs]
    print(f"{len(images)} references from {sys.argv[1]}")
    print()
    print(
        "| codec and settings | mean bytes | PSNR RGB min | PSNR RGB mean "
        "| PSNR Y min | PSNR Y mean | encode ms/image |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, fmt, options in SETTINGS:
        sizes, rgb, luma, seconds = [], [], [], []
        for image in images:
            best = math.inf
            for _ in range(3):
                buffer = io.BytesIO()
                started = time.perf_counter()
                image.save(buffer, fmt, **options)
                best = min(best, time.perf_counter() - started)
            seconds.append(best)
            sizes.append(buffer.tell())
            buffer.seek(0)
            decoded = Image.open(buffer).convert("RGB")
            rgb.append(psnr(image, decoded))
            luma.append(psnr(image.convert("L"), decoded.convert("L")))
        n = len(images)
        print(
            f"| {name} | {sum(sizes) // n} | {min(rgb):.2f} | {sum(rgb) / n:.2f} "
            f"| {min(luma):.2f} | {sum(luma) / n:.2f} | {sum(seconds) / n * 1000:.2f} |"
        )


if __name__ == "__main__":
    main()
