"""Images to bytes for storage: PNG for masks, cutouts and overlays, JPEG for overlays.

PNGs at the default level go through ``worker.imaging.png``: every row "Up"-filtered with
numpy and the image deflated in pieces on several threads, with ISA-L where the ``isal``
package is installed. Same pixels as Pillow's encoder, different bytes, an order of
magnitude faster on photo-sized outputs (bench/README.md, "PNG"): Pillow spends half its
time choosing a filter per row (all five tried), which on photos compresses no better than
Up. ``encode_png_pillow`` is the plain encoder, kept as the reference (and used for other
levels and for images with a tRNS colour).
"""

from __future__ import annotations

import io
import zlib

from PIL import Image

from worker.imaging import png

# Level 1: about three times faster than the default 6 for a fifth more bytes (bench/README.md,
# "PNG"); encoding is on every job's path, while a megabyte more in S3 costs next to nothing.
# This level (the default) takes the fast writer; any other goes through Pillow.
PNG_COMPRESS_LEVEL = 1
# Masks and label maps through Pillow use zlib's run-length strategy: faster, and label maps
# half the bytes. The fast writer has no strategy.
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
