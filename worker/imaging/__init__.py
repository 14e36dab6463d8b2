"""Decode images, handle masks, compose cutouts and overlays, encode outputs.

Plain numpy and Pillow, no models: the inference code takes a ``DecodedImage`` and gives
back masks; everything here works the same with or without them.
"""

from worker.imaging.compose import cutout, overlay, palette_color
from worker.imaging.decode import DecodedImage, load_image
from worker.imaging.encode import encode_jpeg, encode_png
from worker.imaging.masks import (
    area,
    as_mask,
    bbox,
    label_map_from_png,
    label_map_to_png,
    mask_from_png,
    mask_to_png,
    rle_decode,
    rle_encode,
)

__all__ = [
    "DecodedImage",
    "load_image",
    "cutout",
    "overlay",
    "palette_color",
    "encode_png",
    "encode_jpeg",
    "area",
    "as_mask",
    "bbox",
    "rle_encode",
    "rle_decode",
    "mask_to_png",
    "mask_from_png",
    "label_map_to_png",
    "label_map_from_png",
]
