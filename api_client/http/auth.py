"""API keys of the HTTP API: bearer tokens stored as SHA-256 hashes (``SEGQ_API_KEYS``),
each with the ``s3://`` prefixes its jobs and uploads may use and a requests-per-minute
budget, kept as a token bucket in Redis (one Lua script: atomic, shared by every API
process).

With no keys configured the API is open (local development): every request is the
``OPEN`` principal, allowed what the deployment allows (``SEGQ_ALLOWED_INPUTS``), and only
clients on loopback are served.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import secrets
from dataclasses import dataclass
from typing import Optional

import redis

from config.contract import S3Ref, folder
from config.errors import ForbiddenLocation, RateLimited, Unauthorized
from config.settings import ApiKey, Settings

KEY_PREFIX = "segq_"
RATE_KEY = "segq:api:rate:{key_id}"

# A token bucket of ``capacity`` tokens refilled at ``rate`` tokens a millisecond; the
# clock is Redis' own (TIME), so API processes on different machines agree. Returns
# {1, 0} when a token was taken, else {0, milliseconds until one is there}.
TOKEN_BUCKET = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local allowed, wait = 0, 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = math.ceil((1 - tokens) / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate) + 1000)
return {allowed, wait}
"""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A new random API key (shown once; only its hash is stored)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: an API key (its hash's first 16 hex digits as ``id``),
    or ``OPEN`` when no keys are configured."""

    id: str
    name: str
    prefixes: Optional[tuple[str, ...]]  # None: whatever the deployment allows
    rate_per_minute: Optional[int]

    def check(self, ref: S3Ref) -> None:
        """``ForbiddenLocation`` unless this key may use ``ref``'s bucket and key."""
        if self.prefixes is None:
            return
        for allowed in self.prefixes:
            bucket, _, key_prefix = allowed.removeprefix("s3://").partition("/")
            if bucket == ref.bucket and ref.key.startswith(folder(key_prefix)):
                return
        raise ForbiddenLocation(
            f"this API key may not use {ref.uri} (it may use {', '.join(self.prefixes)})",
            location=ref.uri,
        )


OPEN = Principal(id="open", name="open", prefixes=None, rate_per_minute=None)


def is_loopback(host: Optional[str]) -> bool:
    if host in ("localhost", "testclient"):
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class Authenticator:
    """Bearer key -> ``Principal``, and the rate limit of each key."""

    def __init__(self, settings: Settings, redis_client: redis.Redis) -> None:
        self.keys: list[ApiKey] = list(settings.api_keys)
        self.redis = redis_client
        self._bucket = redis_client.register_script(TOKEN_BUCKET)

    @property
    def open(self) -> bool:
        return not self.keys

    def authenticate(self, authorization: Optional[str], client_host: Optional[str]) -> Principal:
        if self.open:
            if not is_loopback(client_host):
                raise Unauthorized(
                    "no API keys are configured (SEGQ_API_KEYS), so this API serves loopback "
                    "clients only"
                )
            return OPEN
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("send an API key as 'Authorization: Bearer KEY'")
        digest = hash_key(token)
        found = None
        for key in self.keys:  # compare every hash, in constant time each
            if hmac.compare_digest(key.sha256, digest):
                found = key
        if found is None:
            raise Unauthorized("unknown API key")
        principal = Principal(
            id=digest[:16], name=found.name or digest[:8], prefixes=tuple(found.prefixes),
            rate_per_minute=found.rate_per_minute,
        )  # fmt: skip
        self.limit(principal)
        return principal

    def limit(self, principal: Principal) -> None:
        """Take one token from the key's bucket (capacity: one minute's worth);
        ``RateLimited`` with ``retry_after`` seconds when it is empty."""
        if principal.rate_per_minute is None:
            return
        rate = principal.rate_per_minute / 60_000.0
        allowed, wait_ms = self._bucket(
            keys=[RATE_KEY.format(key_id=principal.id)], args=[principal.rate_per_minute, repr(rate)]
        )
        if not int(allowed):
            retry_after = max(1, math.ceil(int(wait_ms) / 1000))
            raise RateLimited(
                f"over {principal.rate_per_minute} requests a minute; retry in {retry_after} s",
                retry_after=retry_after,
            )
