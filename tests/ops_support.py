"""Scraping a process's /metrics, and starting commands as users run them (ops tests)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO_ROOT

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200, await response.text()
        assert response.content_type == "text/plain", response.content_type
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels`` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(ls)[label] for (n, ls), _ in samples.items() if n == name and label in dict(ls)}


async def wait_scrape(port: int, *, within: float = 20.0) -> Samples:
    """Until the process's metrics listener answers."""
    async with asyncio.timeout(within):
        while True:
            with contextlib.suppress(aiohttp.ClientConnectionError):
                return await scrape(port)
            await asyncio.sleep(0.1)


class Command:
    """``python -m <module> ...`` with its output in a log file."""

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_for_line(self, text: str, *, within: float) -> None:
        """Until the log has a line with ``text`` (the process got that far)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while text not in self.log():
            if self.process.returncode is not None or loop.time() > deadline:
                raise AssertionError(f"no {text!r} in the log:\n{self.log()}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            async with asyncio.timeout(15):
                await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


Start = Callable[..., Any]


@asynccontextmanager
async def commands(directory: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start commands (``start(module, *args, env)``); all are stopped (SIGTERM) at the end."""
    started: list[Command] = []

    async def start(module: str, *args: str, env: Mapping[str, str]) -> Command:
        log_path = directory / f"{module}-{len(started)}.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                *args,
                env={**os.environ, **env},
                cwd=REPO_ROOT,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        command = Command(process, log_path)
        started.append(command)
        return command

    try:
        yield start
    finally:
        for command in reversed(started):
            await command.stop()
