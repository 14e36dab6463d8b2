"""The app of this process's environment, for ``segq worker``, ``celery -A worker.celery``
and Flower. The one module that reads settings when imported."""

from config.settings import get_settings
from worker.app import create_app

app = create_app(get_settings())
