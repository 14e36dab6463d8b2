"""The HTTP API and the try-it page: ``create_app(settings)`` (FastAPI), served by
``segq api`` (uvicorn). Needs the ``api`` extra (``pip install 'segq[api]'``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from config.settings import Settings


def create_app(settings: "Settings") -> "FastAPI":
    """The app for ``settings`` (imported on call, so ``api_client.http`` imports without
    FastAPI installed)."""
    from api_client.http.app import create_app as make

    return make(settings)
