"""What JSON every layer carries alike: the budget a submitted value must fit.

The gateway reads bodies with orjson (1,024 levels, integers of 64 bits), but
every later layer decodes its messages with pydantic, whose JSON parser
refuses a document whose arrays and objects nest deeper than
``JSON_NESTING_LIMIT`` around a scalar, and encodes with
orjson, which cannot write an integer beyond 64 bits. A submitted value sits
inside the messages that carry it:

    message                          where the value sits                depth added
    submission envelope (owner)      {"payload": v}                      1
    work message, the owner's marker {"submission": {"payload": v}}      2
    lifecycle events (recorder, SSE) {"submission": {"payload": v}}      2
    a worker's result, its event     {"result": v}                       1
    a result in a worker's batch     {"reports": [{"result": v}]}        3

so ``payload`` and ``initial_state`` may nest ``MAX_VALUE_DEPTH`` levels and a
handler's result ``MAX_RESULT_DEPTH`` (a result deeper than a batch leaves room
for is sent alone, not in a worker's ``Results`` batch). Depth counts arrays and objects: a
scalar is 0, ``[]`` is 1, ``{"a": [1]}`` is 2. (pydantic counts the scalar
at the bottom as a level too, so an empty innermost array would pass with one
level more; the budget does not tell the two apart and allows the lesser.)

``tests/test_json_limits.py`` checks these numbers against the real encoders
and decoders, so a new pydantic or a new envelope that changes them fails
there, not in production.
"""

from __future__ import annotations

from typing import Any

import orjson

# pydantic-core's JSON parser: a document may nest this many arrays/objects
# around a scalar (its recursion limit counts 201 values down any path).
JSON_NESTING_LIMIT = 200
# The deepest a submitted value sits in any message that carries it (above).
SUBMISSION_NESTING = 2
RESULT_NESTING = 1
MAX_VALUE_DEPTH = JSON_NESTING_LIMIT - SUBMISSION_NESTING
MAX_RESULT_DEPTH = JSON_NESTING_LIMIT - RESULT_NESTING
# What a worker's ``Results`` batch adds around each report: its object and the list.
RESULTS_BATCH_NESTING = 2

# orjson writes integers in [-2**63, 2**64 - 1] and raises beyond; it reads
# larger ones as floats (silently inexact), so the gateway refuses them.
MIN_INT = -(2**63)
MAX_INT = 2**64 - 1

# orjson reads a document of at most this many levels (the gateway's bodies).
ORJSON_READ_DEPTH = 1024
# orjson's encoder refuses arrays/objects nested deeper than this (``nests_deeper``).
ORJSON_ENCODE_DEPTH = 254

# The smallest default max_message_size of the brokers we support (RabbitMQ 4.x;
# 3.10 allows 128 MiB): a body, once stamped and wrapped in a work message or a
# lifecycle event, must fit in one message, so the body limit leaves room for that.
MAX_BODY_BYTES_CAP = 16 * 1024 * 1024 - 64 * 1024


def nests_deeper(value: Any, limit: int) -> bool:
    """Whether ``value`` (any JSON-able value orjson can write) nests deeper than ``limit``.

    orjson's own recursion check measures it: wrapped in ``ORJSON_ENCODE_DEPTH -
    limit`` lists, a value encodes only if it nests at most ``limit`` levels.
    That is one pass in C, ten times faster than walking the value in Python.
    """
    if not isinstance(value, (dict, list)):
        return False
    wrapped = value
    for _ in range(ORJSON_ENCODE_DEPTH - limit):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except orjson.JSONEncodeError:
        return True
    return False
