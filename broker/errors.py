"""Our broker errors. aio-pika/aiormq errors are mapped to these at the boundary.

BrokerError
├── BrokerUnavailable      no connection/channel, or the broker closed it  → 503
│   └── ConfirmTimeout     published, but no confirm in time               → 503
├── PublishRejected        the broker nacked (queue at x-max-length)       → 429
└── Unroutable             returned as unroutable (queue missing)          → retry/503
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error this package raises."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached, or dropped the connection or channel."""


class ConfirmTimeout(BrokerUnavailable):
    """No publisher confirm arrived in time; the message may or may not be stored."""


class PublishRejected(BrokerError):
    """The broker nacked the publish: the queue is at its maximum length."""


class Unroutable(BrokerError):
    """The broker returned the message: no queue is bound to the routing key."""
