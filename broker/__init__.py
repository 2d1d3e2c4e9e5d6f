"""RabbitMQ plumbing shared by gateway, dispatcher and worker."""

from broker.errors import (
    BrokerError,
    BrokerUnavailable,
    ConfirmTimeout,
    PublishRejected,
    Unroutable,
)

__all__ = ["BrokerError", "BrokerUnavailable", "ConfirmTimeout", "PublishRejected", "Unroutable"]
