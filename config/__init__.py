"""Settings and the job contract shared by producers (api_client) and workers."""

from config.errors import SegqError
from config.settings import Settings, get_settings

__all__ = ["Settings", "get_settings", "SegqError"]
