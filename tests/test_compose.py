"""compose.yaml: every process can reach what it uses, and comes back when it dies."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr
from pydantic_settings import BaseSettings
from yarl import URL

from dispatcher import Settings as DispatcherSettings
from gateway.settings import Settings as GatewaySettings
from recorder import RecorderSettings
from worker import WorkerSettings

COMPOSE = Path(__file__).resolve().parent.parent / "compose.yaml"
RESTARTS = {"always", "unless-stopped", "on-failure"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SETTINGS: dict[str, type[BaseSettings]] = {
    "gateway": GatewaySettings,
    "dispatcher": DispatcherSettings,
    "recorder": RecorderSettings,
    "worker": WorkerSettings,
}


def _services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def _one_shot(services: dict[str, Any]) -> set[str]:
    """Services others wait to have completed: they run once and exit."""
    return {
        name
        for service in services.values()
        # depends_on is a mapping with conditions, or a plain list of names.
        for name, dependency in _dependencies(service).items()
        if isinstance(dependency, dict)
        and dependency.get("condition") == "service_completed_successfully"
    }


def _dependencies(service: dict[str, Any]) -> dict[str, Any]:
    depends_on = service.get("depends_on") or {}
    if isinstance(depends_on, list):
        return {name: None for name in depends_on}
    return dict(depends_on)


def test_every_long_running_service_has_a_restart_policy() -> None:
    services = _services()
    long_running = set(services) - _one_shot(services)

    assert {"rabbitmq", "redis", "gateway", "dispatcher", "recorder", "worker"} <= long_running
    for name in sorted(long_running):
        assert services[name].get("restart") in RESTARTS, name


def test_every_address_a_process_would_default_to_loopback_is_a_service_of_the_file() -> None:
    """In a container 127.0.0.1 is the container itself: a URL left to its default
    (the gateway's Redis once) reaches nothing."""
    services = _services()
    for name in sorted(set(services) - _one_shot(services)):
        command = str(services[name].get("command", "")).split()
        if command[:2] != ["python", "-m"]:
            continue
        settings = SETTINGS[command[2]]
        environment = services[name].get("environment") or {}
        for field, info in settings.model_fields.items():
            default = info.get_default(call_default_factory=True)
            value = default.get_secret_value() if isinstance(default, SecretStr) else default
            if not field.endswith("_url") or URL(str(value)).host not in LOOPBACK:
                continue
            variable = f"POLOS_{field.upper()}"
            assert variable in environment, (name, variable)
            for url in _default(str(environment[variable])).split(","):
                assert URL(url).host in services, (name, variable)


def _default(value: str) -> str:
    """What compose makes of ``${NAME:-default}`` when NAME is not set."""
    match = re.fullmatch(r"\$\{[A-Z_]+:-(.*)\}", value)
    return match.group(1) if match else value


def test_the_gateway_reads_the_store_the_recorder_writes() -> None:
    services = _services()
    gateway, recorder = services["gateway"]["environment"], services["recorder"]["environment"]

    assert gateway["POLOS_REDIS_URL"] == recorder["POLOS_REDIS_URL"]
    assert "redis" in services["gateway"]["depends_on"]
