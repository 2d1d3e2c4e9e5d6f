"""The operator page (``/ui``) in a real headless Chromium (Debian's chromium and
chromedriver, which ``make install`` puts on the machine): it loads behind the admin
key, shows a queue after a submission, and an execution's status changes live.

Selenium's calls block, and the gateway runs in this test's event loop: every one
goes through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from gateway.auth import create_admin_key
from tests.execution_support import System, running_system

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ADMIN_KEY = "polos-test-admin-key"
T = TypeVar("T")


@pytest.fixture
async def system(amqp_url: str, tmp_path: Path) -> AsyncIterator[System]:
    create_admin_key(tmp_path / "projects.json", ADMIN_KEY)
    async with running_system(amqp_url, tmp_path, dispatcher=False) as system:
        await system.start_dispatcher(dispatcher_status_interval_seconds=0.3)
        yield system


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            pytest.fail(f"{path} is missing: `make install` installs chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,900",
    ):
        options.add_argument(argument)
    # An explicit driver path: Selenium Manager never looks for (or downloads) one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


async def off_loop(call: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(call, *args)


def _wait(driver: webdriver.Chrome, condition: Callable[[Any], Any], seconds: float = 15) -> Any:
    # An element the page redrew meanwhile is looked for again at the next poll.
    return WebDriverWait(
        driver, seconds, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
    ).until(condition)


async def test_the_page_shows_a_queue_and_an_execution_changing_live(
    system: System, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    base = str(system.client.make_url("/ui"))
    project = system.project

    def login() -> None:
        browser.get(base)
        _wait(browser, lambda d: d.find_element(By.ID, "login").is_displayed())
        browser.find_element(By.ID, "key").send_keys(ADMIN_KEY)
        browser.find_element(By.CSS_SELECTOR, "#login button").click()
        _wait(browser, lambda d: d.find_element(By.ID, "main").is_displayed())

    await off_loop(login)
    execution_id = await system.submit("sleep", queue_name="ui", payload={"seconds": 8})

    def queue_shown() -> list[str]:
        # Cells read in one go each time: the page redraws the row on every status.
        selector = f'#queues tr[data-queue="{project}/ui"] td'

        def shown(d: webdriver.Chrome) -> list[str] | None:
            texts = [td.text for td in d.find_elements(By.CSS_SELECTOR, selector)]
            # The owner's status arrives within its interval: holding 1, an owner named.
            return texts if len(texts) > 5 and texts[3].startswith("1") else None

        cells: list[str] = _wait(browser, shown)
        return cells

    cells = await off_loop(queue_shown)
    assert cells[:3] == [project, "ui", "∞"]
    assert cells[5] not in ("", "—"), "the owning dispatcher"

    def open_execution() -> str:
        # Each element is looked up and used in one step, retried while stale: the
        # page redraws the project list and the tables as their data refreshes.
        def choose(d: webdriver.Chrome) -> bool:
            Select(d.find_element(By.ID, "project")).select_by_value(project)
            return True

        def click_row(d: webdriver.Chrome) -> bool:
            d.find_element(By.CSS_SELECTOR, f'tr[data-execution="{execution_id}"]').click()
            return True

        _wait(browser, choose)
        browser.execute_script("window.polosNotReloaded = true;")
        _wait(browser, click_row)
        status: str = _wait(
            browser, lambda d: d.find_element(By.ID, "timeline-status").get_attribute("data-status")
        )
        return status

    first = await off_loop(open_execution)
    assert first in ("admitted", "running"), first

    def finished_live() -> None:
        _wait(
            browser,
            lambda d: (
                d.find_element(By.ID, "timeline-status").get_attribute("data-status") == "completed"
            ),
        )
        steps: list[str | None] = _wait(
            browser,
            lambda d: [
                li.get_attribute("data-status")
                for li in d.find_elements(By.CSS_SELECTOR, "#timeline-events li")
            ],
        )
        assert steps[-1] == "completed", steps
        assert "running" in steps, steps
        assert browser.execute_script("return window.polosNotReloaded === true;")
        browser.save_screenshot(str(tmp_path / "ui.png"))
        if target := os.environ.get("POLOS_UI_SCREENSHOT"):  # docs/ui.png
            _wait(browser, lambda d: '"completed"' in d.find_element(By.ID, "timeline-detail").text)
            row = f'#queues tr[data-queue="{project}/ui"] td:nth-child(4)'
            _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, row).text == "0")
            browser.save_screenshot(target)

    await off_loop(finished_live)
    record = await system.get(execution_id)
    assert record["status"] == "completed"


async def test_the_page_data_needs_the_admin_key_not_a_project_key(system: System) -> None:
    client = system.client
    page = await client.get("/ui")
    assert page.status == 200  # the page itself holds no data
    for headers in ({}, system.headers, {"Authorization": "Bearer wrong"}):
        response = await client.get("/ui/api/queues", headers=headers)
        assert response.status == 401, headers
        assert (await response.json())["error_type"] == "ADMIN_KEY_REQUIRED"
    response = await client.post("/ui/api/session", json={"key": system.tenant.api_key})
    assert response.status == 401
    # The admin key opens the page's data, and nothing of a project's API.
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert (await client.get("/ui/api/queues", headers=admin)).status == 200
    response = await client.get(
        "/api/v1/workflows/echo/runs", headers={**admin, "X-Project-ID": system.project}
    )
    assert response.status == 401
    response = await client.post(
        "/api/v1/workflows/echo/run",
        json={"payload": None},
        headers={**admin, "X-Project-ID": system.project},
    )
    assert response.status == 401


async def test_the_page_data_says_each_queues_strategy(system: System) -> None:
    client = system.client
    for queue, fields in (("keyed", {"concurrency_strategy": "partition"}), ("plain", {})):
        response = await client.post(
            "/api/v1/workflows/echo/run",
            json={"payload": None, "queue_name": queue, "queue_concurrency_limit": 2, **fields},
            headers=system.headers,
        )
        assert response.status == 200, await response.text()
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    # One project's (a shared test broker holds more queues than the page shows).
    response = await client.get("/ui/api/queues", params={"project": system.project}, headers=admin)
    listed = (await response.json())["queues"]
    assert {q["project_id"] for q in listed} == {system.project}
    rows = {q["queue_name"]: q for q in listed}
    assert (rows["keyed"]["strategy"], rows["keyed"]["limit"]) == ("partition", 2)
    assert rows["plain"]["strategy"] == "deduplicate"
