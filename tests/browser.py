"""Debian's Chromium, headless, driven through chromedriver (installed by `make test`)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@contextlib.contextmanager
def chromium(width: int = 1200, height: int = 1600):
    """A headless Debian Chromium WebDriver with a throwaway profile, quit afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        raise RuntimeError("chromium and chromedriver are needed: `make test` installs Debian's packages")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="clipbeam-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_page(url: str, screenshot: str, width: int = 1200, height: int = 1600) -> dict:
    """Load `url`, wait for it, take a screenshot; returns image load facts."""
    with chromium(width, height) as driver:
        driver.get(url)
        facts = driver.execute_script(
            "const imgs = Array.from(document.images);"
            "return {count: imgs.length, title: document.title,"
            " broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'))};")
        driver.save_screenshot(screenshot)
        return facts
