"""The README stays true: every setting is documented, CI runs the README's test command,
the client methods it shows exist, and api_client imports without onnxruntime."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from api_client.cli import build_parser
from api_client.client import AsyncSegmentationClient, Job, SegmentationClient
from config.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table():
    missing = [n for n in Settings.model_fields if f"`SEGQ_{n.upper()}`" not in README]
    assert not missing


def test_ci_runs_the_readme_test_command():
    assert "make test " in README or "make test\n" in README
    assert re.search(r"^make test$", (ROOT / ".ci/run").read_text(), re.M)


def test_the_client_calls_shown_exist():
    for name in re.findall(r"client\.(\w+)\(", README):
        assert hasattr(SegmentationClient, name), name
        assert hasattr(AsyncSegmentationClient, name), name
    for name in re.findall(r"job\.(\w+)\(", README):
        assert hasattr(Job, name), name


def test_the_cli_commands_shown_exist():
    commands = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001
    shown = set(re.findall(r"^segq ([a-z-]+)", README, re.M))
    assert shown and shown <= commands


def test_api_client_imports_without_onnxruntime():
    code = "import sys, api_client.client, api_client.cli, api_client.events; print('onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_a_worker_without_onnxruntime_says_which_extra_to_install():
    """`pip install segq` without [cpu] or [gpu]: producers work, a worker says what to do."""
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"  # as if it were not installed
        "from api_client.cli import main; sys.exit(main(['worker']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "pip install 'segq[cpu]'" in done.stderr and "'segq[gpu]'" in done.stderr
