"""A real headless browser for the explorer tests: Debian's chromium with its chromedriver, driven by selenium.

`make test` installs the two packages with apt-get when they are missing (nothing is downloaded from anywhere
else: selenium is given both paths, so Selenium Manager never runs). Where they are missing the browser tests fail
and say what to install: the explorer is a feature, and a skipped test would hide that it went untested.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

CHROMIUM = os.environ.get("TCLIP_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("TCLIP_TEST_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Headless, and nothing that reaches the network: without the background-networking flags a closed network
# refuses Chromium's own connections and it logs them.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,900", "--force-device-scale-factor=1")


def missing() -> str | None:
    """Why no browser test can run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found: `make test` installs Debian's {package} (apt-get install {package})"
    return None


@contextlib.contextmanager
def chromium() -> Iterator:
    """A selenium driver on a fresh headless Chromium profile; fails the test, naming what to install, when there is
    no browser."""
    reason = missing()
    if reason:
        pytest.fail(reason, pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="tclip-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_problems(driver) -> list[str]:
    """The browser console's warnings and errors since the last call (selenium drains the log)."""
    return [f"{entry['level']}: {entry['message']}" for entry in driver.get_log("browser")
            if entry["level"] in ("SEVERE", "WARNING")]


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "the page") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def rendered(driver, root_selector: str = ".tclip-x") -> str:
    """The explorer's `data-rendered` marker: "image:item:kind:scale:view" of the last finished render."""
    return driver.execute_script(
        "const r = document.querySelector(arguments[0]); return r ? (r.dataset.rendered || '') : '';", root_selector)


def canvas_rgb(driver, selector: str):
    """The pixels of a canvas as uint8 RGB [h, w, 3] (read back losslessly, as PNG)."""
    import base64

    import cv2
    import numpy as np

    url = driver.execute_script("return document.querySelector(arguments[0]).toDataURL('image/png');", selector)
    encoded = np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8)
    return cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1]
