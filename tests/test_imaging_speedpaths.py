"""The imaging speed paths answer exactly as the plain ones they replace.

The fast PNG writer against Pillow's encoder (same pixels and mode after decoding, a valid
stream for a strict decoder: chunk CRCs, one zlib stream with its Adler-32), in every
layout, with ISA-L and with plain zlib, split into many pieces and strips.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.support import images
from worker.imaging import encode, png
from worker.imaging import masks as maskio

RNG = np.random.default_rng(11)


def reopen(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def strict_parse(data: bytes) -> tuple[list[bytes], bytes]:
    """(chunk types in order, the inflated image data), checking every CRC and the zlib
    stream's own checksum; raises on anything a strict decoder would refuse."""
    assert data[:8] == png.SIGNATURE
    pos, kinds, idat = 8, [], []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind!r}"
        kinds.append(kind)
        if kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    inflater = zlib.decompressobj()
    raw = inflater.decompress(b"".join(idat))
    assert inflater.eof and not inflater.unused_data  # one stream, Adler-32 checked
    return kinds, raw


def cases() -> list[tuple[str, np.ndarray]]:
    photo = np.asarray(images.sample_scene(203, 131))
    alpha = (RNG.random((131, 203)) < 0.6).astype(np.uint8) * 255
    return [
        ("RGB", photo),
        ("RGBA", np.dstack([photo, alpha])),
        ("L", photo[..., 1].copy()),
        ("1", RNG.random((131, 203)) < 0.4),
        ("1", RNG.random((7, 9)) < 0.5),  # row bytes padded
        ("I;16", RNG.integers(0, 65536, (131, 203), dtype=np.uint16)),
        ("RGB", photo[:1]),  # one row
        ("RGB", photo[:, :1].copy()),  # one column
    ]


@pytest.fixture(params=[True, False], ids=["isal", "zlib"])
def deflate(request, monkeypatch):
    if request.param and png._isal is None:
        pytest.skip("isal not installed")
    if not request.param:
        monkeypatch.setattr(png, "_isal", None)
    return request.param


@pytest.fixture(params=["one piece", "many pieces"])
def pieces(request, monkeypatch):
    if request.param == "many pieces":  # tiny pieces and strips: every boundary exercised
        monkeypatch.setattr(png, "PARALLEL_MIN_BYTES", 1)
        monkeypatch.setattr(png, "PIECE_BYTES", 3000)
        monkeypatch.setattr(png, "STRIP_BYTES", 700)
    return request.param


@pytest.mark.parametrize("mode, pixels", cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_fast_png_has_pillows_pixels(mode, pixels, deflate, pieces):
    reference = Image.fromarray(pixels)
    assert reference.mode == mode
    fast = png.write_png(png.Source.from_array(pixels))
    strict_parse(fast)
    back, plain = reopen(fast), reopen(encode.encode_png_pillow(reference))
    assert back.mode == plain.mode and back.size == plain.size
    assert np.array_equal(np.asarray(back), np.asarray(plain))
    assert np.array_equal(np.asarray(back), pixels)


@pytest.mark.parametrize("row_filter", [png.FILTER_NONE, png.FILTER_SUB, png.FILTER_UP])
def test_every_filter_decodes_to_the_same_pixels(row_filter, pieces):
    photo = np.asarray(images.sample_scene(97, 61))
    for pixels in (photo, RNG.integers(0, 65536, (61, 97), dtype=np.uint16)):
        data = png.write_png(png.Source.from_array(pixels), row_filter=row_filter)
        _, raw = strict_parse(data)
        row = len(raw) // pixels.shape[0]
        assert set(raw[::row]) == {row_filter}
        assert np.array_equal(np.asarray(reopen(data)), pixels)


def test_pieces_depend_on_the_image_alone_and_cover_it():
    assert png.pieces_for(3000, 4000 * 4) == png.pieces_for(3000, 4000 * 4)
    ranges = png.pieces_for(3000, 4000 * 4)
    assert len(ranges) > 1 and ranges[0][0] == 0 and ranges[-1][1] == 3000
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert png.pieces_for(480, 640) == [(0, 480)]


def test_a_large_image_through_the_pool_equals_one_piece(monkeypatch):
    pixels = np.asarray(images.sample_scene(1200, 900))
    parallel = png.write_png(png.Source.from_array(pixels))
    assert len(png.pieces_for(900, 1200 * 3)) > 1
    monkeypatch.setattr(png, "PARALLEL_MIN_BYTES", 1 << 40)
    single = png.write_png(png.Source.from_array(pixels))
    assert strict_parse(parallel)[1] == strict_parse(single)[1]
    assert np.array_equal(np.asarray(reopen(parallel)), pixels)


def test_adler32_combine_is_zlibs():
    data = RNG.integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    for cut in (0, 1, 5552, 65521, 100_000, 199_999):
        a, b = data[:cut], data[cut:]
        combined = png.adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b))
        assert combined == zlib.adler32(data)


def test_encode_png_takes_the_fast_path_and_keeps_the_icc_profile():
    img = images.sample_scene(64, 48)
    img.info["icc_profile"] = b"not really a profile, but bytes to carry"
    fast = encode.encode_png(img)
    kinds, _ = strict_parse(fast)
    assert kinds.count(b"iCCP") == 1
    assert reopen(fast).info["icc_profile"] == img.info["icc_profile"]
    assert reopen(encode.encode_png_pillow(img)).info["icc_profile"] == img.info["icc_profile"]
    assert np.array_equal(np.asarray(reopen(fast)), np.asarray(img))


def test_images_the_fast_writer_cannot_write_go_through_pillow():
    keyed = Image.new("RGB", (8, 8), (1, 2, 3))
    keyed.info["transparency"] = (1, 2, 3)
    assert not encode.fast_png_supports(keyed)
    assert reopen(encode.encode_png(keyed)).info.get("transparency") == (1, 2, 3)
    for other in (Image.new("P", (8, 8)), Image.new("LA", (8, 8))):
        assert not encode.fast_png_supports(other)
        assert reopen(encode.encode_png(other)).size == (8, 8)


def test_mask_and_label_map_pngs_round_trip_through_the_fast_writer():
    mask = RNG.random((301, 403)) < 0.3
    assert np.array_equal(maskio.mask_from_png(maskio.mask_to_png(mask)), mask)
    labels = RNG.integers(0, 70_000, (301, 403)).clip(0, 65535).astype(np.int32)
    assert np.array_equal(maskio.label_map_from_png(maskio.label_map_to_png(labels)), labels)
    assert reopen(maskio.label_map_to_png(labels)).mode == "I;16"


def test_a_big_endian_16_bit_image_keeps_its_values():
    values = RNG.integers(0, 65536, (33, 17), dtype=np.uint16)
    img = Image.frombytes("I;16B", (17, 33), values.astype(">u2").tobytes())
    assert encode.fast_png_supports(img)
    assert np.array_equal(np.asarray(reopen(encode.encode_png(img))), values)
