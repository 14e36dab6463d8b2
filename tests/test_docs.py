"""The documents run: every Python and shell block of README.md, docs/README.md,
bench/README.md and docker/README.md is executed here, top to bottom as a user would paste
it, against a local stack (real Redis with a password, real S3, a real worker), or carries a
marker saying why it cannot be run on this machine.

A marker is an HTML comment on the line before the block:

- ``<!-- doc-test: needs docker -->``, ``needs gpu``, ``needs hub``: not run here (no Docker
  engine, no GPU, no route to the Hugging Face hub);
- ``<!-- doc-test: quickstart -->``: the README's two commands, run by
  ``test_quickstart_make_demo`` (``make demo`` until Ctrl-C) and checked against ``.ci/run``
  (``make test``, which is this suite);
- ``<!-- doc-test: ci -->``: commands CI runs; each must be in ``.ci/run``;
- ``<!-- doc-test: long -->``: needs torch or the full-size models; run by the long tier
  (``make test-long``) in an environment that has them.

Everything else runs in the default suite. Documents may not mention the developers'
machines, and every repository path they cite must exist.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

from api_client.dev import sample_image
from api_client.dev.localstack import RedisServer
from tests.support.api import ApiProcess
from tests.support.hub import FakeHub, public_repos, serving
from tests.support.stack import Stack, make_stack

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "docs/README.md", "bench/README.md", "docker/README.md"]
RUNNABLE = {"python", "bash", "sh", "shell"}
NOT_HERE = {"needs docker", "needs gpu", "needs hub"}
MARKERS = NOT_HERE | {"quickstart", "ci", "long"}
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Block:
    document: str
    line: int
    language: str
    code: str
    marker: Optional[str]

    @property
    def id(self) -> str:
        return f"{self.document}:{self.line}"


def blocks(document: str) -> list[Block]:
    found = []
    lines = (REPO / document).read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        indent, language = fence.groups()
        start = i
        body = []
        i += 1
        while not re.match(rf"^{indent}```\s*$", lines[i]):
            body.append(lines[i][len(indent):])
            i += 1
        previous = lines[start - 1].strip() if start else ""
        marker = re.fullmatch(r"<!-- doc-test: (.+?) -->", previous)
        found.append(Block(document, start + 1, language, "\n".join(body) + "\n",
                           marker.group(1) if marker else None))  # fmt: skip
        i += 1
    return found


ALL = [b for d in DOCUMENTS for b in blocks(d)]
DEFAULT = [b for b in ALL if b.language in RUNNABLE and b.marker is None]
LONG = [b for b in ALL if b.marker == "long"]


def test_every_block_says_what_it_is_and_every_runnable_one_is_run_or_marked():
    unlabelled = [b.id for b in ALL if not b.language]
    assert not unlabelled, f"blocks without a language (use text for diagrams): {unlabelled}"
    unknown = [(b.id, b.marker) for b in ALL if b.marker and b.marker not in MARKERS]
    assert not unknown, f"unknown doc-test markers: {unknown}"
    assert DEFAULT, "no block is run at all"


def test_documents_cite_no_developer_machine_and_only_files_that_exist():
    for document in [*DOCUMENTS, "docker/.env.example"]:
        text = (REPO / document).read_text()
        for path in ("/work/", "/root/", "refmodels", "/home/"):
            assert path not in text, f"{document} mentions {path}"
        cited = set(re.findall(r"`((?:[\w.-]+/)+[\w.-]+\.(?:py|md|json|yaml|jpg|png|toml|txt))`", text))
        cited |= set(re.findall(r"\]\(((?!https?:)[^)#]+)\)", text))
        for ref in cited:
            if ref.startswith(("/tmp/", "docker/.env")) or "<" in ref:
                continue  # a user's own file, one the reader makes, or another project's
            if "/" in ref and not (REPO / ref.split("/")[0]).exists() and not ref.startswith(".."):
                continue  # a layout inside some other folder (a model repo's files)
            assert (REPO / ref).exists() or (REPO / Path(document).parent / ref).exists(), (
                f"{document} cites {ref}, which is not in the repository"
            )


def test_the_ci_blocks_are_what_ci_runs():
    ci = (REPO / ".ci/run").read_text()
    for block in [b for b in ALL if b.marker in ("ci", "quickstart")]:
        for line in block.code.splitlines():
            command = line.split("#", 1)[0].strip()
            if command and command != "make demo":
                assert re.search(rf"^{re.escape(command)}$", ci, re.M), f"{block.id}: {command}"


# --- running blocks -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs_redis(tmp_path_factory) -> Iterator[RedisServer]:
    """Redis with a password, as docker/compose.yaml runs it."""
    with RedisServer(password="docs-pw", data_dir=tmp_path_factory.mktemp("docs-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def docs_stack(docs_redis, s3_server, sam2_repo, detr_repo, tmp_path_factory, module_monkeypatch) -> Iterator[Stack]:
    """The stack a user has after `make demo`: default buckets, prefix and worker settings."""
    stack = make_stack(docs_redis, s3_server, sam2_repo, detr_repo, tmp_path_factory.mktemp("logs"),
                       module_monkeypatch, output_prefix="jobs/", redis_url=docs_redis.url)  # fmt: skip
    stack.worker(concurrency=1).start()
    yield stack
    stack.stop_workers()


@pytest.fixture(scope="module")
def docs_api(docs_stack, tmp_path_factory) -> Iterator[ApiProcess]:
    """`segq api` of that stack, open on loopback, as `make demo` starts it."""
    with ApiProcess(docs_stack.env(), tmp_path_factory.mktemp("api") / "api.log", keys=[]) as api:
        yield api


@pytest.fixture(scope="module")
def workspace(docs_stack, docs_api, docs_redis, s3_server, sam2_repo, detr_repo, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A user's folder (a photo under the names the documents use, docker/.env filled in
    for this stack) and their shell's environment: what `segq dev` tells other shells,
    and where the models are."""
    folder = tmp_path_factory.mktemp("user")
    for name in ("shoe.jpg", "photo.jpg"):
        (folder / name).write_bytes(sample_image())
    (folder / "docker").mkdir()
    (folder / "docker/.env").write_text(
        f"REDIS_PASSWORD={docs_redis.password}\nREDIS_PORT={docs_redis.port}\n"
        f"MINIO_ROOT_USER={s3_server.access_key}\nMINIO_ROOT_PASSWORD={s3_server.secret_key}\n"
        f"MINIO_PORT={s3_server.port}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEGQ_", "AWS_", "HF_"))}
    env.update(s3_server.env())
    env.update(
        SEGQ_REDIS_URL=docs_stack.settings.redis_url,
        SEGQ_API_URL=docs_api.url,
        SEGQ_SAM2_DIR=str(sam2_repo),
        SEGQ_DETR_DIR=str(detr_repo),
        SEGQ_PROVIDERS='["CPUExecutionProvider"]',
        PATH=f"{BIN}:{env['PATH']}",
        PYTHONPATH=str(REPO),  # bench.* runs from a checkout
    )
    return folder, env


def run_block(block: Block, cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    if block.language == "python":
        argv = [sys.executable, "-c", block.code]
    else:
        argv = ["bash", "-euo", "pipefail", "-c", block.code]
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{block.id} failed:\n{block.code}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.parametrize("block", DEFAULT, ids=lambda b: b.id)
def test_block_runs(block: Block, workspace) -> None:
    folder, env = workspace
    out = run_block(block, folder, env)
    if "client.cancel(batch[-1].id)" in block.code:
        assert "cancelled" in out.split() and "job_not_found" in out.split(), out
    if "segq submit cutout" in block.code:
        assert '"state": "succeeded"' in out, out
    if "/v1/jobs/$job/events" in block.code:
        assert '"state":"succeeded"' in out and '"code":"invalid_prompt"' in out, out
        assert (folder / "cutout.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.long
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("block", LONG, ids=lambda b: b.id)
def test_long_block_runs(block: Block, workspace) -> None:
    folder, env = workspace
    run_block(block, folder, env, timeout=2300)


def test_quickstart_make_demo(sam2_repo, detr_repo, tmp_path) -> None:
    """`make demo` as pasted, from the checkout, with the public models served by a loopback
    stand-in for the hub; it runs the sample and keeps the stack up until Ctrl-C."""
    assert shutil.which("make"), "make is part of the README's two commands"
    output = REPO / "segq-dev-output"
    existed = output.exists()
    with serving(FakeHub(repos=public_repos(sam2_repo, detr_repo))) as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SEGQ_", "AWS_", "HF_"))}
        env.update(HF_ENDPOINT=hub.url, SEGQ_HF_CACHE_DIR=str(tmp_path / "cache"), NO_PROXY="127.0.0.1",
                   SEGQ_PROVIDERS='["CPUExecutionProvider"]', PYTHONUNBUFFERED="1")  # fmt: skip
        demo = subprocess.Popen(["make", "demo"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        out = ""
        try:
            deadline = time.monotonic() + 300
            for line in demo.stdout:
                out += line
                if "keeps running" in line or time.monotonic() > deadline:
                    break
            assert "keeps running" in out, out
            for kind in ("segment", "panoptic", "cutout", "overlay"):
                assert re.search(rf"^{kind}\s+\w+\s+succeeded", out, re.M), out
        finally:
            os.killpg(demo.pid, signal.SIGINT)
            demo.wait(timeout=60)
            if not existed:
                shutil.rmtree(output, ignore_errors=True)
