"""The dispatcher: owns submission queues, admits within limits, hands work to workers."""

from dispatcher.service import Dispatcher
from dispatcher.settings import Settings

__all__ = ["Dispatcher", "Settings"]
