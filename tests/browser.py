"""Headless Chromium for the browser tests (Debian's chromium + chromium-driver).

Without Chromium the tests skip, except under ``CI=true`` where they fail: CI
installs it (.ci/run), so a missing browser there is a broken set-up.
Screenshots go to the test's temporary directory; with
``CLIPPY_UPDATE_SCREENSHOTS=1`` they refresh the README's pictures in docs/.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
)  # fmt: skip


def chromium(window_size: str = "1500,1000", offline: bool = False) -> Iterator:
    """Yield a headless Chrome WebDriver; ``offline`` makes every host name fail to resolve."""
    binary = shutil.which("chromium") or (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None
    )
    driver_path = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
    )
    if binary is None or driver_path is None:
        message = "headless Chromium needs chromium and chromedriver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={window_size}"):
        options.add_argument(flag)
    if offline:
        options.add_argument("--host-resolver-rules=MAP * ~NOTFOUND")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot_path(name: str, tmp_dir: Path) -> Path:
    """Where a test saves screenshot ``name``: docs/ when refreshing them, else ``tmp_dir``."""
    return (DOCS if os.environ.get("CLIPPY_UPDATE_SCREENSHOTS") == "1" else Path(tmp_dir)) / name
