"""A digest of a transaction's content, so a gid reused for other content is noticed.

The gid is the client's idempotency key: sending the same submit again is harmless and
answers like the first one, but the same gid with other steps, payloads or options is a
client bug that a silent success would hide. The digest covers what the client chose
(steps, payloads, options, custom data, …) and leaves out `wait_result`, which only
says how this one request wants its answer, and the trace context, which a resent
request may carry anew.
"""

from __future__ import annotations

import hashlib

import orjson

from coordinator.model import Trans
from coordinator.store.codec import options_to_json


def fingerprint(trans: Trans) -> str:
    options = options_to_json(trans.options, wait_result=False)
    content = orjson.dumps(
        [trans.trans_type, list(trans.steps), list(trans.payloads), trans.custom_data,
         trans.query_prepared, trans.protocol, options],
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(content).hexdigest()[:32]
