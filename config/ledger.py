"""What was sent, so a job whose message the broker lost can be sent again.

kombu's Redis transport takes a message off its queue with ``BRPOP`` and only then records
it as unacknowledged (``unacked`` hash). A worker SIGKILLed between the two, or while Redis
is handing it the message (Redis pops the message for a blocked client that is already
dead, and the reply goes nowhere), loses the message: it is in no queue and not
unacknowledged, so neither kombu's restore nor the recovery sweep can give it back, and
its job stays ``queued`` (or ``running``) for ever. With embedding affinity a click is
sent to its image's holder the moment it is submitted, so killing that worker in step with
a click lost the click every time (bench/README.md, "A holder killed mid-session").

So the producer also keeps each job's message here (task, body, shared queue) until the
job ends, in the status Redis: ``segq:sent`` (job id -> when sent) and
``segq:sent:jobs`` (job id -> JSON). The recovery sweep (``worker.recovery``) sends a job
again, to its shared queue, when its message has been nowhere in Redis (no queue, not
unacknowledged, not held by a live worker) for one heartbeat TTL.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import redis

SENT_INDEX = "segq:sent"
SENT_JOBS = "segq:sent:jobs"
MISSING_INDEX = "segq:sent:missing"  # job id -> when its message was first seen nowhere


def record_sent(client: redis.Redis, job_id: str, task: str, body: Any, queue: str, *, now: float) -> None:
    """Keep what re-sending ``job_id`` to ``queue`` (its shared queue) takes."""
    entry = json.dumps({"task": task, "body": body, "queue": queue})
    client.pipeline().hset(SENT_JOBS, job_id, entry).zadd(SENT_INDEX, {job_id: now}).execute()


def forget_sent(client: redis.Redis, *job_ids: str) -> None:
    if job_ids:
        client.pipeline().zrem(SENT_INDEX, *job_ids).hdel(SENT_JOBS, *job_ids).zrem(
            MISSING_INDEX, *job_ids
        ).execute()


def sent_entry(client: redis.Redis, job_id: str) -> Optional[dict[str, Any]]:
    raw = client.hget(SENT_JOBS, job_id)
    try:
        entry = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


# Which of ARGV (job ids) is the id of no message in the lists KEYS[2..] and in the hash
# KEYS[1] (kombu's unacked hash): one script, so a message moving from a queue to the unacked
# hash meanwhile is never seen as missing. A message's id is its header ``"id": "<job id>"``
# (the body is base64, and ``argsrepr`` is a string, its quotes escaped).
MISSING_SCRIPT = """
local wanted, left = {}, 0
for _, id in ipairs(ARGV) do wanted[id] = true; left = left + 1 end
local function scan(values)
  for _, v in ipairs(values) do
    for id in string.gmatch(v, '"id": "([^"]+)"') do
      if wanted[id] then wanted[id] = nil; left = left - 1 end
    end
    if left == 0 then return end
  end
end
scan(redis.call('HVALS', KEYS[1]))
for i = 2, #KEYS do
  if left == 0 then break end
  scan(redis.call('LRANGE', KEYS[i], 0, -1))
end
local missing = {}
for id, _ in pairs(wanted) do table.insert(missing, id) end
return missing
"""
