"""The speed paths of imaging and post-processing answer exactly as the plain ones.

The fast PNG writer against Pillow's encoder (same pixels and mode after decoding, a valid
stream for a strict decoder: chunk CRCs, one zlib stream with its Adler-32), in every
layout, with ISA-L and with plain zlib, split into many pieces and strips. The compiled
kernels (numba) against the numpy code they replace, bit for bit.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.support import images
from worker.imaging import accel, compose, encode, png
from worker.imaging.decode import load_image
from worker.imaging import masks as maskio
from worker.inference import detr, transforms

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


# --- compiled kernels (numba) against their numpy references ------------------------------

needs_numba = pytest.mark.skipif(not accel.ENABLED, reason="numba not installed: only numpy runs")


def detr_outputs(seed: int, queries: int, h: int, w: int, *, coarse: bool = False):
    """Random DETR outputs with about half the queries kept; ``coarse`` draws mask logits
    and class logits from a few values, so many pixels tie between queries."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.0, (queries, 251)).astype(np.float32)
    winners = rng.choice([1, 2, 92, 93, 130, 250], queries)
    logits[np.arange(queries), winners] += np.float32(6.0 if not coarse else 8.0)
    if coarse:
        masks = rng.choice(np.float32([-3.0, 0.0, 0.5, 2.0]), (queries, h, w))
        logits = np.round(logits)  # equal class scores for equal rows
        logits[1::2] = logits[0::2][: len(logits[1::2])]
    else:  # a noisy rectangle per query, so some queries win most of their own pixels
        masks = rng.normal(0.0, 1.5, (queries, h, w)).astype(np.float32) - 4
        for mask in masks:
            y, x = rng.integers(0, h), rng.integers(0, w)
            mask[y : y + rng.integers(1, h + 1), x : x + rng.integers(1, w + 1)] += 8
    return logits.astype(np.float32), masks.astype(np.float32)


@needs_numba
@pytest.mark.parametrize(
    "seed, queries, mask_hw, size, coarse",
    [
        (0, 30, (25, 34), (133, 100), False),
        (1, 60, (50, 67), (401, 299), False),
        (2, 20, (50, 67), (37, 23), False),  # shrinking
        (3, 40, (30, 40), (640, 480), True),  # ties everywhere
        (4, 12, (8, 8), (1, 1), False),
        (5, 100, (20, 27), (1000, 750), False),
    ],
)
@pytest.mark.parametrize("mask_threshold", [0.5, 0.3])
def test_detr_postprocess_compiled_equals_numpy(monkeypatch, seed, queries, mask_hw, size,
                                                coarse, mask_threshold):
    logits, masks = detr_outputs(seed, queries, *mask_hw, coarse=coarse)
    kwargs = dict(id2label={}, thing_ids={1, 2}, mask_threshold=mask_threshold,
                  overlap_threshold=0.5, threshold=0.3)
    fast = detr.postprocess(logits, masks, size, **kwargs)
    monkeypatch.setattr(detr, "_assign_pixels_fast", lambda *a: None)
    monkeypatch.setattr(detr, "_gather_rows", None)
    plain = detr.postprocess(logits, masks, size, **kwargs)
    assert fast.segments == plain.segments
    assert fast.segmentation.dtype == plain.segmentation.dtype == np.int32
    assert np.array_equal(fast.segmentation, plain.segmentation)
    if size[0] * size[1] > 1 and not coarse:
        assert plain.segments  # the case means something


@needs_numba
@pytest.mark.parametrize("coarse", [False, True])
def test_detr_assignment_compiled_equals_numpy_owners_and_counts(coarse):
    logits, masks = detr_outputs(7, 24, 40, 53, coarse=coarse)
    scores = np.random.default_rng(7).uniform(0.5, 1.0, 24).astype(np.float32)
    if coarse:
        scores = np.round(scores, 1)  # equal scores: ties between queries
    owner, confident, won, boxes = detr._assign_pixels_fast(masks, scores, 517, 389, 0.5)
    plain_owner, plain_confident = detr._assign_pixels(masks, scores, 517, 389, 0.5)
    assert np.array_equal(owner, plain_owner) and confident == plain_confident
    assert len(np.unique(owner)) > 3
    assert np.array_equal(won, np.bincount(plain_owner.ravel(), minlength=24))
    for k in range(24):
        if won[k]:
            ys, xs = np.nonzero(plain_owner == k)
            assert tuple(boxes[k]) == (ys.min(), xs.min(), ys.max(), xs.max())


@needs_numba
@pytest.mark.parametrize("in_shape", [(256, 256), (37, 53), (1, 5)])
@pytest.mark.parametrize("out_shape", [(3000, 4000), (480, 640), (17, 9), (1, 1)])
@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_upsample_mask_compiled_equals_numpy(in_shape, out_shape, threshold):
    logits = np.random.default_rng(sum(in_shape)).normal(0, 8, in_shape).astype(np.float32)
    logits[0, 0] = threshold  # a value exactly at the threshold
    fast = transforms.upsample_mask(logits, *out_shape, threshold=threshold)
    plain = transforms.upsample_mask_reference(logits, *out_shape, threshold=threshold)
    assert fast.dtype == plain.dtype == np.bool_
    assert np.array_equal(fast, plain)


@needs_numba
def test_bilinear_columns_equal_bilinear_rows():
    planes = np.random.default_rng(3).normal(0, 1, (5, 31, 47)).astype(np.float32)
    for width in (1, 30, 47, 1001):
        cols = transforms.bilinear_columns(planes, width)
        for plane, got in zip(planes, cols):
            assert np.array_equal(got, transforms.BilinearRows(plane, 9, width).cols)


ICC = b"an ICC profile's bytes, carried from input to output"


def decoded(pixels: np.ndarray):
    """A DecodedImage of an RGB or RGBA array with an ICC profile, as load_image makes it."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", icc_profile=ICC)
    return load_image(out.getvalue(), max_pixels=1 << 26, max_bytes=1 << 26, min_side=1)


@needs_numba
@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("crop", [False, True])
@pytest.mark.parametrize("shape", [(131, 203), (1, 7), (67, 1), (300, 211)])
def test_cutout_compiled_equals_pillow(channels, crop, shape, monkeypatch):
    h, w = shape
    pixels = RNG.integers(0, 256, (h, w, channels), dtype=np.uint8)
    image = decoded(pixels)
    mask = RNG.random(shape) < 0.5
    mask[h // 2, w // 2] = True
    fast = compose.cutout(image, mask, crop=crop)
    fused, size = compose.cutout_png(image, mask, crop=crop)
    monkeypatch.setattr(compose, "_cut_rows", None)
    plain = compose.cutout(image, mask, crop=crop)
    assert fast.mode == plain.mode == "RGBA" and fast.size == plain.size == size
    assert np.array_equal(np.asarray(fast), np.asarray(plain))
    for data in (encode.encode_png(fast), fused):
        back = reopen(data)
        assert back.mode == "RGBA" and np.array_equal(np.asarray(back), np.asarray(plain))
        assert back.info.get("icc_profile") == ICC
    assert reopen(encode.encode_png(plain)).info.get("icc_profile") == ICC


@needs_numba
@pytest.mark.parametrize("kind", ["label map int32", "label map uint8", "masks"])
@pytest.mark.parametrize("alpha", [0.5, 0.37, 1.0])
def test_overlay_compiled_equals_numpy(kind, alpha, monkeypatch):
    h, w = 157, 233
    image = decoded(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))
    labels = RNG.integers(0, 9, (h, w))
    layers = {
        "label map int32": labels.astype(np.int32),
        "label map uint8": labels.astype(np.uint8),
        "masks": [labels == i for i in range(1, 9)],
    }[kind]
    fast = compose.overlay(image, layers, alpha=alpha, outline=True)
    fast_flat = compose.overlay(image, layers, alpha=alpha)
    fused = compose.overlay_png(image, layers, alpha=alpha)
    fused_outline = compose.overlay_png(image, layers, alpha=alpha, outline=True)
    monkeypatch.setattr(compose, "_tint_rows", None)
    plain = compose.overlay(image, layers, alpha=alpha, outline=True)
    plain_flat = compose.overlay(image, layers, alpha=alpha)
    assert fast.mode == plain.mode == "RGB"
    assert np.array_equal(np.asarray(fast), np.asarray(plain))
    assert np.array_equal(np.asarray(fast_flat), np.asarray(plain_flat))
    assert np.array_equal(np.asarray(reopen(fused)), np.asarray(plain_flat))
    assert np.array_equal(np.asarray(reopen(fused_outline)), np.asarray(plain))
    plain_png = reopen(encode.encode_png(plain_flat))
    assert reopen(fused).info.get("icc_profile") == plain_png.info.get("icc_profile")


def rle_cases() -> list[np.ndarray]:
    blob = np.zeros((97, 131), bool)
    blob[20:60, 30:90] = True
    return [
        blob,
        ~blob,
        RNG.random((53, 71)) < 0.5,
        np.ones((5, 6), bool),
        np.zeros((5, 6), bool),
        np.eye(9, dtype=bool),
        RNG.random((1, 40)) < 0.5,
        RNG.random((40, 1)) < 0.5,
        np.ones((1, 1), bool),
    ]


@needs_numba
@pytest.mark.parametrize("mask", rle_cases())
def test_rle_compiled_equals_the_transposed_reference(mask):
    assert maskio.rle_encode(mask) == maskio.rle_encode_reference(mask)
    assert np.array_equal(maskio.rle_decode(maskio.rle_encode(mask)), mask)


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.uint8, np.int64])
def test_rle_of_a_label_map_equals_one_mask_at_a_time(dtype):
    labels = (RNG.random((83, 61)) * 5).astype(dtype)
    labels[10:40, 5:50] = 7
    ids = [1, 2, 3, 4, 7, 9]  # 9: absent
    got = maskio.rle_encode_labels(labels, ids)
    assert list(got) == ids
    for i in ids:
        assert got[i] == maskio.rle_encode_reference(labels == i)


@pytest.mark.parametrize("threads", [2, 3])
def test_model_input_in_bands_equals_one_resize(threads, monkeypatch):
    """Bands are cut only where Pillow gives exactly the pixels of one resize."""
    monkeypatch.setattr(accel, "THREADS", threads)
    rng = np.random.default_rng(threads)
    sizes = [(640, 480), (2000, 1500), (1600, 1200), (1200, 900), (480, 640), (1000, 3000)]
    sizes += [tuple(int(v) for v in rng.integers(40, 2500, 2)) for _ in range(12)]
    split_seen = 0
    for w, h in sizes:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for out in ((1024, 1024), detr.model_input_size(w, h)):
            split_seen += len(transforms.resize_split((w, h), out)) > 2
            fast = transforms.to_model_input(img, *out)
            assert np.array_equal(fast, transforms.to_model_input_reference(img, *out)), (w, h)
    assert split_seen >= 5


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.uint8, np.int64])
def test_value_range_is_min_and_max(dtype):
    values = RNG.integers(0, 200, (301, 157)).astype(dtype)
    values[123, 45], values[7, 150] = 0, 201
    assert compose.value_range(values) == (0, 201)
    assert compose.value_range(values[:1, :1]) == (int(values[0, 0]),) * 2
    assert compose.value_range(np.zeros((0, 4), dtype)) == (0, 0)
    if np.issubdtype(dtype, np.signedinteger):
        values[200, 3] = -5
        assert compose.value_range(values) == (-5, 201)


def test_the_writer_reads_a_cutouts_array_only_while_the_image_still_shares_it():
    pixels = RNG.integers(0, 256, (40, 30, 4), dtype=np.uint8)
    img = Image.fromarray(pixels)
    png.share_pixels(img, pixels)
    assert png.shared_pixels(img) is pixels
    assert np.array_equal(np.asarray(reopen(encode.encode_png(img))), pixels)
    img.putpixel((0, 0), (1, 2, 3, 4))  # Pillow copies a mapped image before changing it
    assert png.shared_pixels(img) is None
    back = np.asarray(reopen(encode.encode_png(img)))
    assert tuple(back[0, 0]) == (1, 2, 3, 4) and np.array_equal(back[1:], pixels[1:])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_gets_its_own_pool():
    big = np.asarray(images.sample_scene(1200, 900))
    assert len(png.pieces_for(900, 1200 * 3)) > 1
    png.write_png(png.Source.from_array(big))  # the parent's pool exists now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: a multi-piece PNG must not wait on the parent's (absent) threads
        signal.alarm(30)  # a hung child ends itself; the parent then reads nothing
        try:
            data = png.write_png(png.Source.from_array(big))
            ok = np.array_equal(np.asarray(reopen(data)), big)
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        assert pipe.read() == b"1"
    os.waitpid(pid, 0)
