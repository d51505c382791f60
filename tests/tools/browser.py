"""Headless chromium for the browser tests (Debian's chromium and chromium-driver, driven by
selenium; a browser that downloads its own build cannot be fetched here)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):  # not a skip: CI must install them
        pytest.fail(
            "the browser check needs Debian's chromium and chromium-driver: "
            "apt-get install -y chromium chromium-driver",
            pytrace=False,
        )
    return browser, driver


@contextlib.contextmanager
def chrome(window: str = "1280,900") -> Iterator[Any]:
    """A headless chromium (fresh profile, no network features), quit on exit."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    browser, driver = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--window-size={window}",
    ):
        options.add_argument(flag)
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        session = webdriver.Chrome(options=options, service=Service(driver))
        try:
            yield session
        finally:
            session.quit()
