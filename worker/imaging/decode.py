"""Untrusted image bytes in, the 8-bit RGB picture the models see out.

Every way bytes can be wrong ends as an ``InvalidImage`` subclass with a code: empty, not an
image, truncated (``InvalidImage``), over the byte or pixel limit (``ImageTooLarge``), too
small (``ImageTooSmall``), animated (``UnsupportedImage``). The pixel limit is checked from
the header, before a single pixel is decoded, so a small file that declares a huge canvas
costs nothing. EXIF rotation only swaps the sides and a reduced decode is chosen after the
check, so neither can slip an image past it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError, features

from config.errors import ImageTooLarge, ImageTooSmall, InvalidImage

# An allowlist keeps Pillow's rarer plugins (EPS runs Ghostscript; many have seen little
# fuzzing) away from untrusted bytes. Phone-camera JPEGs with a preview open through "JPEG"
# as format "MPO".
FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF") + (
    ("AVIF",) if features.check("avif") else ()
)

# segq's pixel limit (max_pixels) is per call and checked from the header before any pixel
# is decoded. Pillow's own bomb limit is a process-wide setting segq leaves to its owner:
# at its default, a picture over 2 x Image.MAX_IMAGE_PIXELS (about 179 MP) is refused by
# Pillow when opened, which maps to ImageTooLarge as well.

# Orientations 5-8 turn the picture a quarter, so the displayed width is the stored height.
_QUARTER_TURNS = {5, 6, 7, 8}


@dataclass(frozen=True)
class DecodedImage:
    """An image as displayed (EXIF orientation applied), ready for models and compositing.

    ``rgb`` is what the models see: 8-bit RGB with any alpha composited over black.
    ``rgba`` keeps the image's own colours under its alpha (None when it has no alpha), so a
    cutout shows the original pixels rather than darkened ones. ``width`` and ``height`` are
    the displayed full-resolution size, even when ``rgb`` came from a reduced decode.
    """

    rgb: Image.Image
    alpha: Optional[np.ndarray]
    width: int
    height: int
    format: str
    mode: str
    rgba: Optional[Image.Image] = None
    frames: int = 1  # an animated or multi-page image is segmented on its first frame

    def describe_frames(self) -> dict[str, int]:
        """What a job's result says about the frames: nothing for a single one."""
        return {} if self.frames == 1 else {"frames": self.frames, "frame_used": 0}

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def is_reduced(self) -> bool:
        """True when ``rgb`` is smaller than the image (a ``reduce_to`` decode)."""
        return self.rgb.size != self.size


def load_image(
    data: bytes,
    *,
    max_pixels: int,
    max_bytes: int,
    min_side: int = 2,
    reduce_to: Optional[int] = None,
) -> DecodedImage:
    """Decode ``data`` into a ``DecodedImage`` or raise an ``InvalidImage`` subclass.

    ``reduce_to``: for a JPEG at least twice as large as needed, let libjpeg decode at 1/2,
    1/4 or 1/8 scale (its scaled inverse DCT), keeping both sides at least ``reduce_to``.
    A JPEG decodes at half scale in about half the time, but
    the pixels are not those of a full decode followed by a resize: each is roughly the mean
    of its block (a box filter), chroma is upsampled differently, and the last row and
    column may stand for a partial block. Resized to SAM's 1024x1024 input, the two differ
    by 0.13 levels of 255 on average, 1 at the 99th percentile and 10 at worst (sharp
    edges). Use it only for model input; cutouts and overlays need a full decode.
    """
    with _open(data, max_bytes) as img:
        width, height = img.size
        described = f"{img.format} image of {width}x{height}"
        frames = _check_header(img, described, max_pixels=max_pixels, min_side=min_side)
        mode = img.mode
        if reduce_to and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (reduce_to, reduce_to))
        try:
            img.load()
            if _apply_orientation(img):
                width, height = height, width
            rgb, rgba = _to_rgb(img)
        except Image.DecompressionBombError as e:
            raise ImageTooLarge(f"{described} is too large to decode: {e}") from None
        except Exception as e:  # truncated or corrupt pixel data, in any of Pillow's types
            raise InvalidImage(f"{described} could not be decoded: {e}") from None

    alpha = np.asarray(rgba.getchannel("A")) if rgba is not None else None
    return DecodedImage(
        rgb=rgb, alpha=alpha, width=width, height=height, format=img.format, mode=mode,
        rgba=rgba, frames=frames,
    )  # fmt: skip


def read_size(
    data: bytes, *, max_pixels: int, max_bytes: int, min_side: int = 2
) -> tuple[int, int]:
    """The displayed ``(width, height)`` of ``data`` (EXIF orientation applied) from its
    header, with every check ``load_image`` makes before decoding a pixel, and the same
    errors. Enough for a job whose pixels are already known (a cached SAM 2 embedding)."""
    with _open(data, max_bytes) as img:
        width, height = img.size
        _check_header(img, f"{img.format} image of {width}x{height}", max_pixels=max_pixels,
                      min_side=min_side)
        try:
            turned = img.getexif().get(ExifTags.Base.Orientation, 1) in _QUARTER_TURNS
        except Exception as e:  # a corrupt EXIF block, in any of Pillow's types
            raise InvalidImage(f"{img.format} image has unreadable metadata: {e}") from None
    return (height, width) if turned else (width, height)


def _open(data: bytes, max_bytes: int) -> Image.Image:
    """Pillow's lazy image for ``data``: header read, no pixel decoded yet."""
    if len(data) > max_bytes:
        raise ImageTooLarge(
            f"image is {len(data)} bytes, over the limit of {max_bytes}",
            bytes=len(data),
            max_bytes=max_bytes,
        )
    if not data:
        raise InvalidImage("image is empty (0 bytes)")
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise InvalidImage(
            f"not an image in a supported format ({', '.join(FORMATS)}); "
            f"{len(data)} bytes starting {bytes(data[:8])!r}"
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"image is over the limit of pixels Pillow opens: {e}") from None
    except Exception as e:  # Pillow reports a corrupt header with many exception types
        raise InvalidImage(f"unreadable image header: {e}") from None


def _check_header(img: Image.Image, described: str, *, max_pixels: int, min_side: int) -> int:
    """Refuse what is too large or too small from the header; returns the frame count."""
    width, height = img.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{described} has {width * height} pixels, over the limit of {max_pixels}",
            width=width,
            height=height,
            max_pixels=max_pixels,
        )
    if min(width, height) < min_side:
        raise ImageTooSmall(
            f"{described} is too small: both sides must be at least {min_side} pixels",
            width=width,
            height=height,
        )
    try:
        # a phone's MPO is one picture plus previews; other formats' frames are frames
        frames = 1 if img.format == "MPO" else int(getattr(img, "n_frames", 1))
    except Exception as e:  # counting reads each frame's header, which may be corrupt
        raise InvalidImage(f"{described} could not be decoded: {e}") from None
    return frames


def _apply_orientation(img: Image.Image) -> bool:
    """Apply the EXIF orientation in place; True when it swapped width and height."""
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    ImageOps.exif_transpose(img, in_place=True)
    return orientation in _QUARTER_TURNS


def _to_rgb(img: Image.Image) -> tuple[Image.Image, Optional[Image.Image]]:
    """(RGB composited over black, the RGBA it came from or None when there is no alpha)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_high_depth_to_8bit(img)).convert("RGB"), None
    if "A" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        black = Image.new("RGB", rgba.size)
        # Pillow's masked composite rounds rgb * a / 255 to nearest, in C.
        return Image.composite(rgba.convert("RGB"), black, rgba.getchannel("A")), rgba
    return (img if img.mode == "RGB" else img.convert("RGB")), None


def _high_depth_to_8bit(img: Image.Image) -> np.ndarray:
    """Scale by the range of the mode, not clip (Pillow's own conversion to "L" clips).

    16-bit samples keep their top byte (65535 -> 255, 32768 -> 128). "I" is how TIFF and
    older PNG readers hold 16-bit samples, so it is scaled the same after clipping to
    0..65535. "F" is taken as 0.0..1.0, the convention of float image files; NaN is black.
    """
    values = np.asarray(img)
    if img.mode == "F":
        scaled = np.rint(np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * 255)
        return scaled.astype(np.uint8)
    return (np.clip(values, 0, 0xFFFF) >> 8).astype(np.uint8)
