"""Shared fixtures. Engineers append their own imports and fixtures below."""

from tests.support.services import redis_server, redis_url, s3_server, settings  # noqa: F401
from tests.support.onnx_models import detr_repo, sam2_repo  # noqa: F401,E402
from tests.support.stack import module_monkeypatch, stack  # noqa: F401,E402
from tests.support.receiver import receiver  # noqa: F401,E402
from tests.support.hub import hub  # noqa: F401,E402
