"""The HTTP gateway: validates, authenticates, stamps and publishes submissions."""

from gateway.app import create_app
from gateway.settings import Settings

__all__ = ["Settings", "create_app"]
