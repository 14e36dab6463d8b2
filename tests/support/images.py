"""Test images made on the spot: every mode, orientation and kind of broken file the
decoder must handle, plus the synthetic photo shipped as ``api_client/assets/sample.jpg``.

Each generator returns encoded bytes (what arrives from S3) unless its name says otherwise.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
QUADRANT_COLOURS = {"top_left": RED, "top_right": GREEN, "bottom_left": BLUE, "bottom_right": WHITE}


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **params)
    return out.getvalue()


def noise_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- orientation ------------------------------------------------------------------------


def quadrants(width: int = 64, height: int = 48) -> np.ndarray:
    """The picture as it should be displayed: four flat quadrants of QUADRANT_COLOURS."""
    img = np.zeros((height, width, 3), dtype=np.uint8)
    h2, w2 = height // 2, width // 2
    img[:h2, :w2] = RED
    img[:h2, w2:] = GREEN
    img[h2:, :w2] = BLUE
    img[h2:, w2:] = WHITE
    return img


def stored_for_orientation(displayed: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores for ``displayed`` under EXIF ``orientation``, written from
    the EXIF definition (which visual side row 0 and column 0 hold), not from Pillow."""
    flips = {
        1: displayed,
        2: displayed[:, ::-1],  # row 0 top, column 0 right
        3: displayed[::-1, ::-1],  # row 0 bottom, column 0 right
        4: displayed[::-1, :],  # row 0 bottom, column 0 left
        5: displayed.transpose(1, 0, 2),  # row 0 left, column 0 top
        6: displayed[:, ::-1].transpose(1, 0, 2),  # row 0 right, column 0 top
        7: displayed[::-1, ::-1].transpose(1, 0, 2),  # row 0 right, column 0 bottom
        8: displayed[::-1, :].transpose(1, 0, 2),  # row 0 left, column 0 bottom
    }
    return np.ascontiguousarray(flips[orientation])


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def oriented_jpeg(orientation: int, width: int = 64, height: int = 48) -> bytes:
    """A JPEG whose displayed picture is ``quadrants(width, height)`` under ``orientation``."""
    stored = stored_for_orientation(quadrants(width, height), orientation)
    return encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif_bytes(orientation))


# --- modes ------------------------------------------------------------------------------


def gray16_png(values: np.ndarray) -> bytes:
    """16-bit grayscale PNG of ``values`` (uint16)."""
    return encode(Image.fromarray(values.astype(np.uint16)), "PNG")


def gray16_big_endian_tiff(values: np.ndarray) -> bytes:
    h, w = values.shape
    img = Image.frombytes("I;16B", (w, h), values.astype(">u2").tobytes())
    return encode(img, "TIFF")


def int32_tiff(values: np.ndarray) -> bytes:
    return encode(Image.fromarray(values.astype(np.int32)), "TIFF")


def float_tiff(values: np.ndarray) -> bytes:
    return encode(Image.fromarray(values.astype(np.float32)), "TIFF")


def cmyk_jpeg(cmyk: tuple[int, int, int, int], size: tuple[int, int] = (32, 24)) -> bytes:
    return encode(Image.new("CMYK", size, cmyk), "JPEG", quality=100)


def palette_png_with_transparency(size: tuple[int, int] = (8, 6)) -> tuple[bytes, np.ndarray]:
    """(PNG bytes, index map): index 0 is opaque red, index 1 fully transparent green."""
    index = np.zeros((size[1], size[0]), dtype=np.uint8)
    index[:, size[0] // 2 :] = 1
    img = Image.fromarray(index, mode="P")
    img.putpalette([255, 0, 0, 0, 255, 0])
    return encode(img, "PNG", transparency=1), index


def rgba_png(width: int = 10, height: int = 8, seed: int = 1) -> tuple[bytes, np.ndarray]:
    """(PNG bytes, the RGBA array): random colours under random alpha."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    return encode(Image.fromarray(pixels, mode="RGBA"), "PNG"), pixels


def la_png(width: int = 10, height: int = 8, seed: int = 2) -> tuple[bytes, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 2), dtype=np.uint8)
    return encode(Image.fromarray(pixels, mode="LA"), "PNG"), pixels


def bilevel_png(bits: np.ndarray) -> bytes:
    return encode(Image.fromarray(bits.astype(bool)), "PNG")


def frames(count: int = 3, size: tuple[int, int] = (16, 12)) -> list[Image.Image]:
    return [Image.new("RGB", size, (60 * i, 100, 200)) for i in range(count)]


def animated(fmt: str, count: int = 3) -> bytes:
    """An animated GIF, WEBP, PNG (APNG) or AVIF, or a multi-page TIFF."""
    first, *rest = frames(count)
    return encode(first, fmt, save_all=True, append_images=rest)


def mpo(count: int = 2) -> bytes:
    """A multi-picture JPEG as phone cameras write (primary image plus a preview)."""
    return animated("MPO", count)


# --- broken and hostile files -------------------------------------------------------------


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A few dozen bytes that declare a ``width`` x ``height`` RGB canvas. The pixel data is
    a fragment, so a decoder that reaches it reports truncation, not the size."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", pixels)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_declaring(width: int, height: int, *, orientation: int = 1) -> bytes:
    """A small real JPEG whose frame header is rewritten to declare ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (16, 16), RED), "JPEG", exif=exif_bytes(orientation)))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


# --- the sample photo ---------------------------------------------------------------------


def sample_scene(width: int = 1280, height: int = 853) -> Image.Image:
    """A synthetic outdoor photo: sky, hills, grass, a red ball, a box and a person."""
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    sky = (1 - y) * np.array([70, 130, 205]) + y * np.array([190, 220, 240])
    img = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    horizon = int(height * 0.58)

    draw.ellipse((int(width * 0.78), 60, int(width * 0.78) + 90, 150), fill=(255, 244, 200))
    clouds = ((230, 140, 38), (290, 125, 50), (350, 145, 36), (900, 210, 30), (950, 198, 42))
    for cx, cy, r in clouds:
        draw.ellipse((cx - 2 * r, cy - r, cx + 2 * r, cy + r), fill=(246, 248, 252))
    hills = [(0, horizon)] + [
        (x, horizon - 70 - int(45 * np.sin(x / 170.0) + 25 * np.sin(x / 61.0)))
        for x in range(0, width + 1, 8)
    ] + [(width, horizon)]
    draw.polygon(hills, fill=(92, 128, 96))

    rng = np.random.default_rng(7)
    ground = np.asarray(img).copy()
    rows = np.arange(horizon, height)
    shade = ((rows - horizon) / (height - horizon))[:, None, None]
    grass = (1 - shade) * np.array([110, 165, 80]) + shade * np.array([60, 120, 50])
    grass = grass + rng.normal(0, 9, (rows.size, width, 1))
    ground[horizon:] = np.clip(grass, 0, 255).astype(np.uint8)
    img = Image.fromarray(ground)
    draw = ImageDraw.Draw(img)

    def shadow(cx: int, cy: int, rx: int, ry: int) -> None:
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=(48, 88, 40))

    # A cardboard box, drawn as three faces.
    bx, by, bw, bh, depth = 180, 560, 230, 170, 60
    shadow(bx + bw // 2 + 30, by + bh, bw // 2 + 50, 22)
    top = [(bx, by), (bx + bw, by), (bx + bw + depth, by - depth), (bx + depth, by - depth)]
    side = [(bx + bw, by), (bx + bw + depth, by - depth), (bx + bw + depth, by + bh - depth),
            (bx + bw, by + bh)]
    draw.polygon(top, fill=(214, 170, 112))
    draw.polygon(side, fill=(160, 118, 70))
    draw.rectangle((bx, by, bx + bw, by + bh), fill=(190, 145, 90))
    draw.rectangle((bx + bw // 2 - 12, by, bx + bw // 2 + 12, by + bh), fill=(222, 200, 160))

    # A red ball with a highlight.
    cx, cy, r = 640, 690, 85
    shadow(cx + 20, cy + r - 6, r + 15, 18)
    for step in range(r, 0, -1):
        t = step / r
        colour = (int(150 + 95 * (1 - t)), int(20 + 30 * (1 - t) ** 2), int(25 + 30 * (1 - t) ** 2))
        ox, oy = int((1 - t) * -28), int((1 - t) * -30)
        draw.ellipse((cx + ox - step, cy + oy - step, cx + ox + step, cy + oy + step), fill=colour)

    # A person: head, torso, arms and legs.
    px, feet = 960, 760
    shadow(px + 25, feet, 70, 14)
    skin, shirt, trousers = (224, 182, 150), (40, 80, 150), (50, 50, 62)
    draw.line((px - 22, feet - 170, px - 28, feet), fill=trousers, width=30)
    draw.line((px + 22, feet - 170, px + 30, feet), fill=trousers, width=30)
    draw.rounded_rectangle((px - 48, feet - 330, px + 48, feet - 160), radius=26, fill=shirt)
    draw.line((px - 44, feet - 310, px - 86, feet - 190), fill=shirt, width=24)
    draw.line((px + 44, feet - 310, px + 92, feet - 200), fill=shirt, width=24)
    draw.ellipse((px - 98, feet - 205, px - 74, feet - 181), fill=skin)
    draw.ellipse((px + 80, feet - 214, px + 104, feet - 190), fill=skin)
    draw.ellipse((px - 36, feet - 410, px + 36, feet - 336), fill=skin)
    draw.chord((px - 38, feet - 414, px + 38, feet - 350), 180, 360, fill=(70, 45, 30))

    return img.filter(ImageFilter.GaussianBlur(0.8))


def sample_jpeg() -> bytes:
    return encode(sample_scene(), "JPEG", quality=90, exif=exif_bytes(1))
