"""Test code only: a worker that imports this (``WorkerProcess(imports=[...])``) takes
``SLOW_ENCODE_S`` seconds (default 1) longer per SAM 2 encode, as a full-size encoder on a
CPU does, so concurrent cold jobs on one image overlap for real."""

from __future__ import annotations

import os
import time

from worker.inference.sam2 import Sam2Model

SLOW_S = float(os.environ.get("SLOW_ENCODE_S", "1"))
_real_encode = Sam2Model.encode


def _slow_encode(self, image, size=None):  # type: ignore[no-untyped-def]
    if image.size != (64, 48):  # not the warm-up probe
        time.sleep(SLOW_S)
    return _real_encode(self, image, size)


Sam2Model.encode = _slow_encode  # type: ignore[method-assign]
