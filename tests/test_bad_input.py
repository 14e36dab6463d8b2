"""Bad input end to end: every kind of wrong job ends ``failed`` with its own code and a
message that says what to fix, the worker that ran it stays the same process, and the
next good job succeeds.

Jobs the client lets through go through the client; jobs it refuses at submit are sent
as raw Celery messages (what a buggy or hostile producer could do) and must end with the
same code the client gives. Malformed messages (not JSON, not ``[args, kwargs, options]``,
another content type, wrong arity, an unknown task name) are published by hand.

All jobs go out as one batch against one worker and are waited for together.
"""

from __future__ import annotations

import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from PIL import Image

from config.celeryconfig import task_queues
from config.contract import JobState, JobStatus, task_name
from config.errors import JobNotFound, SegqError
from tests.support.images import (
    cmyk_jpeg,
    encode,
    gray16_png,
    noise_rgb,
    png_bomb,
    truncated,
)
from tests.support.stack import Stack, make_stack

W, H = 64, 48  # the good image
MISSING_BUCKET = "segq-no-such-bucket"  # allowed, but it does not exist
MAX_IMAGE_BYTES = 1 << 20
JOB_TIMEOUT_S = 60


def real_png_bomb(width: int = 12_000, height: int = 10_000) -> bytes:
    """A complete, valid 8-bit grayscale PNG of ``width`` x ``height`` black pixels: about
    117 KB that would decode to 120 MB (over the default 100-megapixel limit)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    packer = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def mask_png(width: int, height: int) -> bytes:
    mask = np.zeros((height, width), np.uint8)
    mask[: height // 2] = 255
    return encode(Image.fromarray(mask), "PNG")


GOOD_PNG = encode(Image.fromarray(noise_rgb(W, H, seed=3)), "PNG")
GOOD_JPEG = encode(Image.fromarray(noise_rgb(W, H, seed=4)), "JPEG", quality=90)


@dataclass
class Case:
    """One bad job. ``image`` is bytes to upload or an ``s3://`` URI; ``"{good}"`` stands
    for the uploaded good image. ``raw``: the client refuses it, so it is sent as a raw
    message (and the client's refusal is checked to carry the same code). ``hint``: a
    piece of the message that tells the user what is wrong."""

    code: str
    hint: str
    image: Any = "{good}"
    task: str = "segment"
    prompt: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    raw: bool = False


CASES: dict[str, Case] = {
    # --- the image itself ----------------------------------------------------------------
    "not_an_image": Case("invalid_image", "not an image", b"name,score\ncat,0.9\n"),
    "zero_bytes": Case("invalid_image", "empty", b""),
    "truncated_jpeg": Case("invalid_image", "could not be decoded", truncated(GOOD_JPEG)),
    "truncated_png": Case("invalid_image", "truncated", truncated(GOOD_PNG)),
    "decompression_bomb": Case("image_too_large", "over the limit", "{bomb}"),
    "absurd_dimensions": Case("image_too_large", "over the limit", png_bomb(100_000, 100_000)),
    "one_pixel_wide_strip": Case("image_too_small", "at least 2 pixels", png_bomb(100_000, 1)),
    "one_by_one": Case(
        "image_too_small", "at least 2 pixels", encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")
    ),
    "over_the_byte_limit": Case(
        "image_too_large", "over the limit", b"\xff" * (MAX_IMAGE_BYTES + 1)
    ),
    # --- prompts --------------------------------------------------------------------------
    "point_outside": Case(
        "prompt_out_of_bounds", f"outside the {W}x{H} image", prompt={"point": [W + 1, 5]}
    ),
    "box_outside": Case("prompt_out_of_bounds", "goes outside", prompt={"box": [40, 10, 30, 10]}),
    "box_negative_corner": Case(
        "prompt_out_of_bounds", "goes outside", prompt={"box": [-5, 10, 20, 20]}
    ),
    "too_many_points": Case(
        "invalid_prompt",
        "over the limit of 64",
        prompt={"points": [[1 + i % 60, 1 + i % 40] for i in range(65)]},
        raw=True,
    ),
    "nan_coordinate": Case(
        "invalid_prompt", "finite number", prompt={"point": [float("nan"), 5]}, raw=True
    ),
    "infinite_coordinate": Case(
        "invalid_prompt", "finite number", prompt={"box": [0, 0, float("inf"), 10]}, raw=True
    ),
    "string_coordinates": Case(
        "invalid_prompt", "point.0", prompt={"point": ["10", "20"]}, raw=True
    ),
    "empty_point_list": Case(
        "invalid_prompt", "'points' is empty", prompt={"points": []}, raw=True
    ),
    "zero_size_box": Case(
        "invalid_prompt", "must be positive", prompt={"box": [10, 10, 0, 5]}, raw=True
    ),
    "negative_size_box": Case(
        "invalid_prompt", "must be positive", prompt={"box": [10, 10, -5, 5]}, raw=True
    ),
    "labels_do_not_match_points": Case(
        "invalid_prompt",
        "'labels' has 1 entries for 2 points",
        prompt={"points": [[1, 1], [2, 2]], "labels": [1]},
        raw=True,
    ),
    "label_not_0_or_1": Case(
        "invalid_prompt", "labels.0", prompt={"point": [3, 3], "labels": [2]}, raw=True
    ),
    "prompt_not_an_object": Case("invalid_prompt", "malformed prompt", prompt=[3, 3], raw=True),
    # --- options and payload ----------------------------------------------------------------
    "unknown_option": Case("unknown_option", "colour", options={"colour": "red"}, raw=True),
    "option_of_wrong_type": Case(
        "invalid_payload", "min_score", options={"min_score": "0.5"}, raw=True
    ),
    "unknown_mask_format": Case(
        "invalid_payload", "mask_formats", options={"mask_formats": ["gif"]}, raw=True
    ),
    "score_out_of_range": Case(
        "invalid_payload", "min_score", options={"min_score": 1.5}, raw=True
    ),
    "payload_too_large": Case(
        "payload_too_large",
        "over the 65536 limit",
        prompt={"points": [[1.5, 1.5]] * 6000},
        raw=True,
    ),
    "image_not_an_s3_uri": Case(
        "invalid_payload", "s3://bucket/key", image="http://127.0.0.1:9/cat.jpg", raw=True
    ),
    "unknown_model_repo": Case(
        "model_not_allowed", "someone/unknown", options={"repo": "someone/unknown"}
    ),
    "model_file_outside_repo": Case(
        "model_not_allowed", "relative path", options={"encoder_file": "../../../etc/passwd"}
    ),
    # --- locations ----------------------------------------------------------------------------
    "bucket_not_allowed": Case(
        "forbidden_location", "outside the locations", image="s3://segq-elsewhere/cat.jpg"
    ),
    "allowed_bucket_missing": Case(
        "bucket_not_found", "no such bucket", image=f"s3://{MISSING_BUCKET}/cat.jpg"
    ),
    "missing_key": Case(
        "object_not_found", "no such object", image="s3://segq-input/no/such/key.png"
    ),
    "key_outside_allowed_prefixes": Case(
        "forbidden_location",
        "outside the locations",
        image="s3://segq-output/jobs/someone-else/cutout.png",
    ),
    "dot_dot_key": Case(
        "forbidden_location", "'..'", image="s3://segq-input/a/../../segq-output/x.png"
    ),
    "overlay_mask_outside_prefix": Case(
        "forbidden_location",
        "outside the locations",
        task="overlay",
        options={"masks": ["s3://segq-output/jobs/other/mask_0.png"]},
    ),
    "overlay_mask_of_another_size": Case(
        "invalid_mask", "10x10", task="overlay", options={"masks": ["{small_mask}"]}
    ),
}

# Messages no client can produce, published by hand: (how, expected code, hint).
MALFORMED = {
    "body_not_json": (
        "publish",
        b'{"task": "segq.segment", image',
        "application/json",
        "invalid_payload",
        "not valid",
    ),
    "body_not_args_kwargs_options": (
        "publish",
        b'{"task": "segq.segment"}',
        "application/json",
        "invalid_payload",
        "[args, kwargs, options]",
    ),
    "body_a_bare_number": (
        "publish",
        b"7",
        "application/json",
        "invalid_payload",
        "[args, kwargs, options]",
    ),
    "content_type_yaml": (
        "publish",
        b"- [1]\n- {}\n- {}\n",
        "application/x-yaml",
        "invalid_payload",
        "untrusted",
    ),
    "two_arguments": (
        "args",
        [{"task": "segq.segment"}, 2],
        None,
        "invalid_payload",
        "got 2 positional",
    ),
    "keyword_arguments": (
        "kwargs",
        {"job": {"task": "segq.segment"}},
        None,
        "invalid_payload",
        "1 keyword",
    ),
}

GOOD_CASES = {
    "cmyk_jpeg": cmyk_jpeg((0, 200, 200, 10), size=(W, H)),
    "gray_16_bit_png": gray16_png(np.linspace(0, 65535, W * H).reshape(H, W)),
}


@pytest.fixture(scope="module")
def stack(
    redis_server, s3_server, sam2_repo, detr_repo, tmp_path_factory, module_monkeypatch
) -> Iterator[Stack]:
    """One worker whose deployment allows reading a bucket that does not exist, so that
    both answers for a missing bucket can be seen; the hub is never contacted."""
    s = make_stack(
        redis_server,
        s3_server,
        sam2_repo,
        detr_repo,
        tmp_path_factory.mktemp("logs"),
        module_monkeypatch,
        max_image_bytes=MAX_IMAGE_BYTES,
        offline=True,
        allowed_inputs=["s3://segq-input/", f"s3://{MISSING_BUCKET}/"],
    )
    s.worker(name="bad").start()
    yield s
    s.stop_workers()


def worker_pid(stack: Stack) -> int:
    """The pid the worker itself reports over the broker (so it is the process that answers)."""
    hostname = stack.workers[0].hostname
    stats = stack.client.celery.control.inspect(destination=[hostname], timeout=5).stats() or {}
    return stats[hostname]["pid"]


def job_body(task: str, image: str, prompt: Any, options: dict[str, Any]) -> dict[str, Any]:
    return {"task": task_name(task), "image": image, "prompt": prompt, "options": options}


def send_raw(stack: Stack, name: str, *, args: Any = None, kwargs: Any = None) -> str:
    """A Celery message for task ``name`` that bypasses the client's checks."""
    job_id = uuid.uuid4().hex
    queue = task_queues(stack.settings).get(name, stack.settings.queue_interactive)
    stack.client.celery.send_task(name, args=args, kwargs=kwargs, task_id=job_id, queue=queue)
    return job_id


def publish_body(stack: Stack, body: bytes, content_type: str, task: str = "segq.segment") -> str:
    """A message with Celery's headers for ``task`` and a hand-made ``body``."""
    app = stack.client.celery
    job_id = uuid.uuid4().hex
    message = app.amqp.as_task_v2(job_id, task, args=[], kwargs={})
    queue = app.amqp.queues[task_queues(stack.settings)[task]]
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            declare=[queue],
            headers=message.headers,
            content_type=content_type,
            content_encoding="utf-8",
            **message.properties,
        )
    return job_id


def final_status(stack: Stack, job_id: str, deadline: float) -> JobStatus | None:
    """The job's final status; None if it has none by ``deadline`` (a raw message's
    record appears only once the worker has seen it)."""
    while time.monotonic() < deadline:
        try:
            st = stack.client.status(job_id)
        except JobNotFound:
            st = None
        if st is not None and st.is_final:
            return st
        time.sleep(0.1)
    return None


@dataclass
class Batch:
    pid_before: int
    statuses: dict[str, JobStatus | None]
    uris: dict[str, str]


@pytest.fixture(scope="module")
def batch(stack: Stack) -> Batch:
    """Submit every case at once, then wait for all of them."""
    client = stack.client
    uris = {
        "{good}": stack.upload(GOOD_PNG, "good.png"),
        "{bomb}": stack.upload(real_png_bomb(), "bomb.png"),
        "{small_mask}": stack.upload(mask_png(10, 10), "mask.png"),
    }

    def resolve(value: Any) -> Any:
        if isinstance(value, bytes):
            return stack.upload(value, "upload.bin")
        if isinstance(value, str):
            return uris.get(value, value)
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        return value

    pid_before = worker_pid(stack)
    ids: dict[str, str] = {}
    for name, case in CASES.items():
        image, options = resolve(case.image), resolve(case.options)
        if case.raw:
            ids[name] = send_raw(
                stack, task_name(case.task), args=[job_body(case.task, image, case.prompt, options)]
            )
        else:
            ids[name] = client.submit(case.task, image, case.prompt, **options).id
    for name, data in GOOD_CASES.items():
        ids[name] = client.segment(stack.upload(data, name), {"point": [W / 2, H / 2]}).id
    body = job_body("segment", uris["{good}"], None, {})
    ids["unknown_task"] = send_raw(stack, "segq.colourise", args=[body])
    for name, (how, payload, content_type, _, _) in MALFORMED.items():
        if how == "publish":
            ids[name] = publish_body(stack, payload, content_type)
        elif how == "args":
            ids[name] = send_raw(stack, "segq.segment", args=payload)
        else:
            ids[name] = send_raw(stack, "segq.segment", args=[], kwargs=payload)

    deadline = time.monotonic() + JOB_TIMEOUT_S
    statuses = {name: final_status(stack, job_id, deadline) for name, job_id in ids.items()}
    return Batch(pid_before, statuses, uris)


def assert_failed(st: JobStatus | None, code: str, hint: str) -> None:
    assert st is not None, "the job never reached a final state"
    assert st.state is JobState.failed, st
    assert st.error.code == code, st.error
    assert hint in st.error.message, st.error.message


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_job_fails_with_its_code_and_a_message_that_says_why(batch: Batch, name: str) -> None:
    case = CASES[name]
    assert_failed(batch.statuses[name], case.code, case.hint)


@pytest.mark.parametrize("name", sorted(name for name, case in CASES.items() if case.raw))
def test_client_refuses_at_submit_what_the_worker_fails_with_the_same_code(
    stack: Stack, batch: Batch, name: str
) -> None:
    case = CASES[name]
    image = batch.uris.get(case.image, case.image)
    with pytest.raises(SegqError) as refused:
        stack.client.submit(case.task, image, case.prompt, **case.options)
    assert refused.value.code == case.code, refused.value


@pytest.mark.parametrize("name", sorted(GOOD_CASES))
def test_unusual_but_valid_images_succeed(batch: Batch, name: str) -> None:
    st = batch.statuses[name]
    assert st is not None and st.state is JobState.succeeded, st
    assert (st.result["width"], st.result["height"]) == (W, H)


def test_unknown_task_name_fails_the_job_and_the_client_refuses_it(
    stack: Stack, batch: Batch
) -> None:
    assert_failed(batch.statuses["unknown_task"], "unknown_task", "segq.colourise")
    with pytest.raises(SegqError) as refused:
        stack.client.submit("colourise", batch.uris["{good}"])
    assert refused.value.code == "unknown_task"


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_message_fails_the_job_it_names(batch: Batch, name: str) -> None:
    *_, code, hint = MALFORMED[name]
    assert_failed(batch.statuses[name], code, hint)


def test_callback_to_a_private_address_is_refused_at_submit(stack: Stack, batch: Batch) -> None:
    for url in (
        "http://127.0.0.1:8080/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",
    ):
        with pytest.raises(SegqError) as refused:
            stack.client.segment(batch.uris["{good}"], callback_url=url)
        assert refused.value.code == "invalid_url" and "public" in refused.value.message


def test_worker_survives_the_batch_and_the_next_good_job_succeeds(
    stack: Stack, batch: Batch
) -> None:
    worker = stack.workers[0]
    assert worker.proc.poll() is None, worker.log()[-4000:]
    assert worker_pid(stack) == batch.pid_before == worker.proc.pid
    assert "Unrecoverable error" not in worker.log()
    good = batch.uris["{good}"]
    st = stack.client.segment(good, {"box": [4, 4, 40, 30]}).wait(timeout=JOB_TIMEOUT_S)
    assert st.state is JobState.succeeded and st.attempts == 1
    assert stack.client.panoptic(good).wait(timeout=JOB_TIMEOUT_S).state is JobState.succeeded
