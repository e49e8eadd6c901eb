"""A real browser with cookies disabled keeps its session through URL rewriting, across
pages, a form post and a failover (kill -9 of its primary) through the proxy.

Needs Debian's `chromium` and `chromium-driver` (installed by .ci/run) and selenium.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs chromium and chromium-driver")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium, fresh profile, cookies blocked for every site."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # explicit paths: nothing is downloaded
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-proxy-server",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {
        "profile.default_content_setting_values.cookies": 2})
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER,
                                      log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def shown(driver: Any) -> tuple[int, str]:
    """The count and the serving server the page shows."""
    count = int(driver.find_element(By.ID, "count").text)
    return count, driver.find_element(By.ID, "server").text


def click(driver: Any, element_id: str, count: int) -> tuple[int, str]:
    """Click, then wait for the page that shows `count`; returns what it shows."""
    driver.find_element(By.ID, element_id).click()
    WebDriverWait(driver, 15, ignored_exceptions=(
        NoSuchElementException, StaleElementReferenceException)).until(
        lambda d: shown(d)[0] == count, f"the page never showed count {count}")
    return shown(driver)


def test_cookieless_browser_keeps_its_session_across_pages_and_failover(make_cluster,
                                                                         browser):
    cluster = make_cluster(app="examples.flask_app:app", n=2).start(proxy=True)
    browser.get(cluster.proxy_url + "/")
    assert shown(browser)[0] == 0

    # +1 link: creates the session; the redirect back carries the token, so do the links
    for n in (1, 2, 3):
        click(browser, "inc", n)
    assert ";jsessionid=" in browser.current_url
    assert ";jsessionid=" in browser.find_element(By.ID, "inc").get_attribute("href")
    assert browser.get_cookies() == []  # the browser really kept no cookie

    # a form post: its action was rewritten too
    _, primary = click(browser, "inc-post", 4)
    survivor = next(s for s in cluster.servers if s != primary)

    cluster.kill(primary)

    assert click(browser, "inc", 5) == (5, survivor)
    # the new token (new primary) is in the links now, and it keeps working
    token = browser.current_url.split(";jsessionid=", 1)[1]
    assert f"!{survivor}!" in token
    assert click(browser, "inc", 6) == (6, survivor)
    assert browser.get_cookies() == []
