"""SAM 2 pipeline against the tiny decoder whose masks are known functions of the prompt:
coordinates, stretching, upsampling, candidate choice and prompt validation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from config.contract import Prompt
from config.errors import InvalidImage, InvalidPrompt, ModelIncompatible, PromptOutOfBounds
from config.settings import Settings
from tests.support.onnx_models import (
    SAM2_SCORES,
    SAM2_SCORES_WITH_BOX,
    rename_io,
    sam2_expected_centre,
)
from worker.inference.registry import ModelRegistry
from worker.inference.sam2 import Sam2Model
from worker.inference.sessions import create_session
from worker.inference.transforms import IMAGENET_MEAN, IMAGENET_STD

SIZES = [(640, 427), (301, 517)]


@pytest.fixture(scope="module")
def model(sam2_repo: Path) -> Sam2Model:
    return ModelRegistry(Settings(sam2_dir=sam2_repo, providers=["CPUExecutionProvider"])).sam2()


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8), "RGB")


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def test_preprocess_stretches_and_normalises(model: Sam2Model) -> None:
    image = noise_image(640, 427)
    tensor = model.preprocess(image)
    assert tensor.shape == (1, 3, 1024, 1024) and tensor.dtype == np.float32
    resized = np.asarray(image.resize((1024, 1024), Image.BILINEAR), np.float64) / 255.0
    expected = (resized - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(tensor[0].transpose(1, 2, 0), expected, atol=1e-6)


def test_preprocess_stretches_rather_than_letterboxing(model: Sam2Model) -> None:
    # left half red, right half blue on a wide image: the halves still meet mid-frame
    pixels = np.zeros((200, 600, 3), np.uint8)
    pixels[:, :300, 0] = 255
    pixels[:, 300:, 2] = 255
    tensor = model.preprocess(Image.fromarray(pixels, "RGB"))
    red = tensor[0, 0]
    assert (red[:, :510] > 2).all() and (red[:, 514:] < -2).all()
    assert np.ptp(red[:, :510]) == 0  # top and bottom rows are image, not padding


@pytest.mark.parametrize("width,height", SIZES)
@pytest.mark.parametrize("fx,fy", [(0.5, 0.5), (0.2, 0.3), (0.8, 0.7), (0.33, 0.85)])
def test_point_gives_a_mask_centred_on_it(
    model: Sam2Model, width: int, height: int, fx: float, fy: float
) -> None:
    x, y = round(fx * width, 1), round(fy * height, 1)
    embedding = model.encode(noise_image(width, height))
    (best,) = model.predict(embedding, Prompt(point=(x, y)))
    assert best.mask.dtype == np.bool_ and best.mask.shape == (height, width)
    assert best.index == 0 and best.score == pytest.approx(SAM2_SCORES[0])
    cx, cy = centroid(best.mask)
    ex, ey = sam2_expected_centre(x, y, width, height)
    # the model's own convention (half a 1024-frame pixel) puts it within a pixel of (x, y) ...
    assert abs(cx - x) < 1 and abs(cy - y) < 1
    # ... and the mapping is exact: any extra offset or a swapped axis shows here
    assert abs(cx - ex) < 0.1 and abs(cy - ey) < 0.1


@pytest.mark.parametrize("width,height", SIZES)
def test_box_mask_covers_the_box(model: Sam2Model, width: int, height: int) -> None:
    box = (0.2 * width, 0.3 * height, 0.5 * width, 0.4 * height)
    embedding = model.encode(noise_image(width, height))
    (best,) = model.predict(embedding, Prompt(box=box))
    assert best.index == 1 and best.score == pytest.approx(SAM2_SCORES_WITH_BOX[1])
    x, y, w, h = box
    inner = np.zeros((height, width), bool)
    inner[int(np.ceil(y)) + 1 : int(y + h) - 1, int(np.ceil(x)) + 1 : int(x + w) - 1] = True
    outer = np.zeros((height, width), bool)
    outer[
        max(int(y) - 1, 0) : int(np.ceil(y + h)) + 1, max(int(x) - 1, 0) : int(np.ceil(x + w)) + 1
    ] = True
    assert best.mask[inner].all(), "the mask must cover the box"
    assert not best.mask[~outer].any(), "the mask must not spill out of the box"


def test_multimask_returns_all_candidates_best_first(model: Sam2Model) -> None:
    embedding = model.encode(noise_image(640, 427))
    masks = model.predict(embedding, Prompt(point=(300, 200)), multimask=True)
    assert [m.index for m in masks] == [0, 1, 2]
    assert [m.score for m in masks] == pytest.approx(list(SAM2_SCORES))
    assert all(m.mask.shape == (427, 640) and m.mask.dtype == np.bool_ for m in masks)
    assert all(m.logits_lowres is not None and m.logits_lowres.shape == (256, 256) for m in masks)
    # candidate 2 is the complement of candidate 0 (away from the exact zero crossing)
    assert (masks[0].mask & masks[2].mask).sum() == 0

    boxed = model.predict(
        embedding, Prompt(box=(100, 100, 200, 150), point=(200, 170)), multimask=True
    )
    assert [m.index for m in boxed] == [1, 0, 2]
    assert [m.score for m in boxed] == sorted((m.score for m in boxed), reverse=True)


def test_min_score_filters_candidates(model: Sam2Model) -> None:
    embedding = model.encode(noise_image(640, 427))
    prompt = Prompt(point=(300, 200))
    assert [m.index for m in model.predict(embedding, prompt, multimask=True, min_score=0.25)] == [
        0,
        1,
    ]
    assert model.predict(embedding, prompt, multimask=True, min_score=0.99) == []
    assert [m.index for m in model.predict(embedding, prompt, min_score=0.5)] == [0]
    assert model.predict(embedding, prompt, min_score=0.51) == []


@pytest.mark.parametrize("width,height", SIZES)
def test_no_prompt_means_the_centre(model: Sam2Model, width: int, height: int) -> None:
    embedding = model.encode(noise_image(width, height))
    (best,) = model.predict(embedding, None)
    cx, cy = centroid(best.mask)
    assert abs(cx - width / 2) < 1 and abs(cy - height / 2) < 1
    (empty,) = model.predict(embedding, Prompt())
    assert np.array_equal(empty.mask, best.mask)


def test_background_points_do_not_move_the_foreground(model: Sam2Model) -> None:
    embedding = model.encode(noise_image(640, 427))
    prompt = Prompt(points=[(100, 100), (500, 300)], labels=[1, 0])
    (best,) = model.predict(embedding, prompt)
    cx, cy = centroid(best.mask)
    assert abs(cx - 100) < 1 and abs(cy - 100) < 1


def test_prompt_arrays_put_box_corners_first_in_the_1024_frame(model: Sam2Model) -> None:
    prompt = Prompt(box=(10, 20, 30, 40), points=[(320, 100)], labels=[0])
    coords, labels = model.prompt_arrays(prompt, 640, 400)
    np.testing.assert_allclose(coords, [[[16, 51.2], [64, 153.6], [512, 256]]], rtol=1e-6)
    assert coords.dtype == np.float32 and labels.dtype == np.float32
    assert labels.tolist() == [[2, 3, 0]]  # no padding point: the graph adds it


@pytest.mark.parametrize(
    "prompt,code",
    [
        (Prompt(point=(641, 10)), "prompt_out_of_bounds"),
        (Prompt(point=(10, -1)), "prompt_out_of_bounds"),
        (Prompt(box=(600, 10, 50, 50)), "prompt_out_of_bounds"),
    ],
)
def test_bad_prompts_raise_their_codes(model: Sam2Model, prompt: Prompt, code: str) -> None:
    embedding = model.encode(noise_image(640, 427))
    with pytest.raises(InvalidPrompt) as err:
        model.predict(embedding, prompt)
    assert err.value.code == code
    assert isinstance(err.value, PromptOutOfBounds) == (code == "prompt_out_of_bounds")


def test_non_rgb_image_is_rejected(model: Sam2Model) -> None:
    with pytest.raises(InvalidImage):
        model.encode(Image.new("RGBA", (64, 64)))


def test_renamed_output_is_incompatible(sam2_repo: Path, tmp_path: Path) -> None:
    shutil.copytree(sam2_repo, tmp_path / "sam2")
    rename_io(tmp_path / "sam2" / "decoder.onnx", "iou_predictions", "scores")
    settings = Settings(sam2_dir=tmp_path / "sam2", providers=["CPUExecutionProvider"])
    with pytest.raises(ModelIncompatible) as err:
        ModelRegistry(settings).sam2()
    assert err.value.code == "model_incompatible"
    assert "iou_predictions" in err.value.message and "scores" in err.value.message
    encoder = create_session(tmp_path / "sam2" / "encoder.onnx", settings)
    with pytest.raises(ModelIncompatible, match="image_embed"):
        Sam2Model(encoder, encoder)  # an encoder is no decoder: every missing name is listed
