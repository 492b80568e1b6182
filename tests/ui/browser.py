"""Headless Chromium driven by Selenium through Debian's chromedriver: nothing is downloaded (Selenium Manager
never runs, the driver's path is given), and tests skip with the reason when Chromium is not installed."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

CHROMEDRIVER = "/usr/bin/chromedriver"


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


def missing() -> str | None:
    """Why no browser test can run here, or None."""
    if not chromium():
        return "chromium is not installed (Debian: apt-get install chromium chromium-driver; .ci/run installs it)"
    if not Path(CHROMEDRIVER).is_file():
        return f"{CHROMEDRIVER} is missing (Debian: apt-get install chromium-driver; .ci/run installs it)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


def driver(width: int = 1280, height: int = 900) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--lang=en-US"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def wait_for(what: Callable[[], Any], timeout: float, message: str, every: float = 0.5) -> Any:
    """Poll until what() is truthy; fail naming what never happened (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = what()
        except Exception as exc:  # noqa: BLE001 - element not there yet, stale, ...
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message} (last: {last!r})")


def by_id(drv: Any, elem_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return drv.find_element(By.ID, elem_id)


def css(drv: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return drv.find_elements(By.CSS_SELECTOR, selector)


def click_tab(drv: Any, label: str) -> None:
    from selenium.webdriver.common.by import By

    tabs = [b for b in drv.find_elements(By.CSS_SELECTOR, "button[role='tab']") if b.text.strip() == label]
    if not tabs:
        raise AssertionError(f"no tab {label!r}: {[b.text for b in drv.find_elements(By.CSS_SELECTOR, 'button[role=tab]')]}")
    tabs[0].click()


def fill(drv: Any, elem_id: str, text: str) -> None:
    """Type into the textbox inside the component with this elem_id."""
    box = by_id(drv, elem_id).find_elements("css selector", "textarea, input")[0]
    box.clear()
    box.send_keys(text)


def click(drv: Any, elem_id: str) -> None:
    by_id(drv, elem_id).click()
