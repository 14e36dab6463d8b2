"""Images to bytes for storage: PNG for masks, cutouts and overlays, JPEG for overlays.

PNGs at the default level go through ``worker.imaging.png``: every row "Up"-filtered with
numpy and the image deflated in pieces on several threads, with ISA-L where the ``isal``
package is installed. Same pixels as Pillow's encoder, different bytes (4000x3000 photo
outputs, 2-core machine, medians of 5 in one process):

                   Pillow, zlib level 1    segq.png, ISA-L level 1
    RGB overlay    734 ms 15.5 MB          57 ms 14.5 MB
    RGBA cutout    861 ms 17.5 MB          72 ms 16.4 MB
    1-bit mask      30 ms  275 KB          2.7 ms 248 KB
    16-bit labels  137 ms  286 KB          5.3 ms 479 KB

Pillow spent half its time choosing a filter per row (all five tried; Paeth won), which
on these photos compresses no better than Up. ``encode_png_pillow`` is the plain encoder,
kept as the reference (and used for other levels and for images with a tRNS colour).
"""

from __future__ import annotations

import io
import zlib

from PIL import Image

from worker.imaging import png

# zlib level for PNGs through Pillow, chosen by measurement on 4000x3000 outputs of a
# synthetic photo (2-core machine; the best of three runs):
#                  level 1          level 3          level 6 (default)   level 9
#   RGBA cutout    334 ms 4.7 MB    458 ms 4.2 MB    978 ms 3.7 MB       10 s   3.4 MB
#   RGB overlay    303 ms 4.7 MB    394 ms 4.1 MB    950 ms 3.9 MB       6.3 s  3.5 MB
#   1-bit mask       9 ms  20 KB     10 ms  19 KB     16 ms  14 KB       40 ms  9 KB
# Level 1 is three times faster than 6 for a fifth more bytes: encoding is on every job's
# path, while a megabyte more in S3 costs next to nothing. This level (the default) takes
# the fast writer; any other goes through Pillow.
PNG_COMPRESS_LEVEL = 1
# Masks and label maps through Pillow use zlib's run-length strategy (12 MP 1-bit SAM 2
# mask: 23 against 27 ms; DETR label map 191 against 390 KB). The fast writer has none.
FLAT_STRATEGY = zlib.Z_RLE
JPEG_QUALITY = 90


def encode_png(
    img: Image.Image,
    *,
    compress_level: int = PNG_COMPRESS_LEVEL,
    strategy: int = zlib.Z_DEFAULT_STRATEGY,
) -> bytes:
    """PNG bytes of ``img`` in its own mode ("1" gives a 1-bit PNG, "I;16" a 16-bit one).
    At the default level the fast writer encodes it (``strategy`` is then unused); at any
    other, Pillow with zlib's ``strategy`` (``FLAT_STRATEGY`` for masks and label maps)."""
    if compress_level == PNG_COMPRESS_LEVEL and fast_png_supports(img):
        return png.write_png(
            png.Source.from_image(img),
            level=compress_level,
            icc_profile=img.info.get("icc_profile"),
        )
    return encode_png_pillow(img, compress_level=compress_level, strategy=strategy)


def fast_png_supports(img: Image.Image) -> bool:
    """True when the fast writer gives the PNG Pillow would (pixels, mode, ICC profile)."""
    return png.mode_of_image(img) is not None and "transparency" not in img.info


def encode_png_pillow(
    img: Image.Image,
    *,
    compress_level: int = PNG_COMPRESS_LEVEL,
    strategy: int = zlib.Z_DEFAULT_STRATEGY,
) -> bytes:
    """Pillow's PNG encoder: the reference for the fast writer's pixels."""
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=compress_level, compress_type=strategy)
    return out.getvalue()


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of an RGB or grayscale ``img``; JPEG has no alpha, so RGBA is refused."""
    if img.mode not in ("RGB", "L"):
        raise ValueError(f"JPEG takes RGB or L images, not {img.mode}; encode RGBA as PNG")
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()
