"""The job contract both sides import: prompts, options and payloads are validated
strictly, each failure with its own code and a message naming the field."""

from __future__ import annotations

import math

import pytest

from config.contract import (
    JobState,
    Prompt,
    S3Ref,
    output_key,
    parse_options,
    parse_prompt,
    parse_request,
    task_name,
)
from config.errors import (
    InvalidPayload,
    InvalidPrompt,
    PayloadTooLarge,
    PromptOutOfBounds,
    UnknownOption,
    UnknownTask,
)

BASE = {"task": "segment", "image": "s3://segq-input/a/b.jpg"}
LIMITS = dict(max_bytes=64 << 10, max_points=64)


@pytest.mark.parametrize(
    "raw, points, labels, box",
    [
        (None, [], [], None),
        ({"point": [3, 4.5]}, [(3, 4.5)], [1], None),
        ({"points": [[1, 2], [3, 4]], "labels": [1, 0]}, [(1, 2), (3, 4)], [1, 0], None),
        ({"points": [[1, 2], [3, 4]]}, [(1, 2), (3, 4)], [1, 1], None),
        ({"box": [1, 2, 30, 40]}, [], [], (1, 2, 30, 40)),
        ({"box": [1, 2, 30, 40], "point": [5, 6]}, [(5, 6)], [1], (1, 2, 30, 40)),
    ],
)
def test_prompt_forms(raw, points, labels, box):
    prompt = parse_prompt(raw, max_points=64)
    if raw is None:
        assert prompt is None
        return
    assert prompt.all_points == points and prompt.all_labels == labels and prompt.box == box


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"point": ["a", 1]}, "point.0"),
        ({"point": [math.nan, 1]}, "finite"),
        ({"point": [math.inf, 1]}, "finite"),
        ({"point": [1]}, "point"),
        ({"points": []}, "empty"),
        ({"points": [[1, 2]], "labels": [1, 0]}, "2 entries for 1 points"),
        ({"points": [[1, 2]], "labels": [2]}, "labels.0"),
        ({"box": [0, 0, 0, 5]}, "positive"),
        ({"box": [0, 0, -3, 5]}, "positive"),
        ({"point": [1, 2], "points": [[1, 2]]}, "not both"),
        ({"circle": [1, 2, 3]}, "circle"),
        ([1, 2], "Prompt"),
    ],
)
def test_malformed_prompts_name_the_problem(raw, fragment):
    with pytest.raises(InvalidPrompt) as info:
        parse_prompt(raw, max_points=64)
    assert fragment in info.value.message


def test_bounds_are_in_displayed_pixels():
    Prompt(point=(640, 480)).check_bounds(640, 480)  # the far edge is inside
    with pytest.raises(PromptOutOfBounds, match="outside the 640x480 image"):
        Prompt(point=(641, 10)).check_bounds(640, 480)
    with pytest.raises(PromptOutOfBounds, match="box"):
        Prompt(box=(600, 0, 50, 10)).check_bounds(640, 480)
    with pytest.raises(PromptOutOfBounds):
        Prompt(box=(-1, 0, 50, 10)).check_bounds(640, 480)


def test_requests_and_their_codes():
    req = parse_request(
        {**BASE, "prompt": {"point": [1, 2]}, "options": {"multimask": True}}, **LIMITS
    )
    assert req.task == "segq.segment" and req.ref == S3Ref(bucket="segq-input", key="a/b.jpg")
    assert req.typed_options().multimask is True
    cases = [
        ({**BASE, "task": "colourise"}, UnknownTask),
        ({**BASE, "options": {"colour": 1}}, UnknownOption),
        ({**BASE, "options": {"multimask": "yes"}}, InvalidPayload),
        ({**BASE, "options": {"min_score": 1.5}}, InvalidPayload),
        ({**BASE, "image": "https://example.com/x.jpg"}, InvalidPayload),
        ({**BASE, "image": "s3://bucket-only"}, InvalidPayload),
        ({**BASE, "extra": 1}, UnknownOption),
        ({**BASE, "prompt": {"points": [[1, 1]] * 65}}, InvalidPrompt),
        ("not json", InvalidPayload),
        ("[1, 2]", InvalidPayload),
        ({**BASE, "options": {"masks": ["s3://x/y.png"] * 5000}}, PayloadTooLarge),
    ]
    for raw, error in cases:
        with pytest.raises(error):
            parse_request(raw, **LIMITS)


def test_names_keys_and_states():
    assert task_name("panoptic") == "segq.panoptic" == task_name("segq.panoptic")
    assert output_key("jobs", "abc", "mask_0.png") == "jobs/abc/mask_0.png"
    assert output_key("jobs/", "abc", "m.png") == "jobs/abc/m.png"
    assert S3Ref.parse("s3://b/k.jpg?versionId=v1").version_id == "v1"
    assert [s.is_final for s in JobState] == [False, False, True, True, True]
    assert parse_options("overlay", {"alpha": 0.3}).alpha == 0.3
    with pytest.raises(InvalidPayload):
        parse_options("overlay", {"alpha": 2})
