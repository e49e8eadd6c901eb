"""A real browser through the proxy, with cookies blocked and with cookies kept.

Blocked: the session lives in the URLs (`;jsessionid=`), across pages, a form post and a
failover (kill -9 of its primary). Kept: after the first round trip no URL carries the
token — no link, form action, redirect or address — across the same steps.

Needs Debian's `chromium` and `chromium-driver` (installed by .ci/run) and selenium; under
CI (`CI=true`) their absence fails the tests instead of skipping them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
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
CHROMEDRIVER = next((p for p in (shutil.which("chromedriver"), "/usr/bin/chromedriver",
                                 "/usr/lib/chromium/chromedriver") if p and os.access(p, os.X_OK)),
                    None)
TOKEN = ";jsessionid="

# app -> (module:attribute, whether its page has the +1 form)
APPS = {"demo": ("backends.demo:app", False), "flask": ("examples.flask_app:app", True)}


@pytest.fixture
def make_browser(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Starts headless Chromium (fresh profile) that blocks or keeps cookies."""
    if not (CHROMIUM and CHROMEDRIVER):
        why = "needs Debian's chromium and chromium-driver"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    drivers: list[Any] = []

    def start(*, cookies: bool) -> Any:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM  # explicit paths: nothing is downloaded
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-proxy-server",
                     f"--user-data-dir={tmp_path / f'profile{len(drivers)}'}"):
            options.add_argument(flag)
        if not cookies:
            options.add_experimental_option("prefs", {
                "profile.default_content_setting_values.cookies": 2})
        # every request the browser makes, with the redirect that led to it
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
        service = webdriver.ChromeService(executable_path=CHROMEDRIVER,
                                          log_output=str(tmp_path / "chromedriver.log"))
        driver = webdriver.Chrome(options=options, service=service)
        drivers.append(driver)
        driver.set_page_load_timeout(20)
        return driver

    yield start
    for driver in drivers:
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


def navigations(driver: Any) -> list[tuple[str, str | None]]:
    """The pages the browser requested since last asked: (URL, Location of the redirect
    that led there, if one did)."""
    out = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] != "Network.requestWillBeSent" or params.get("type") != "Document":
            continue
        redirect = params.get("redirectResponse")
        location = None
        if redirect is not None:
            location = next(v for k, v in redirect["headers"].items() if k.lower() == "location")
        out.append((params["request"]["url"], location))
    return out


def token_free(driver: Any) -> None:
    """Neither the address nor anything in the page (links, forms, sources) has a token."""
    assert TOKEN not in driver.current_url
    assert TOKEN not in driver.page_source


@pytest.mark.parametrize("app", list(APPS))
def test_cookieless_browser_keeps_its_session_across_pages_and_failover(make_cluster,
                                                                         make_browser, app):
    module, has_form = APPS[app]
    cluster = make_cluster(app=module, n=3).start(proxy=True)
    browser = make_browser(cookies=False)
    browser.get(cluster.proxy_url + "/")
    assert shown(browser)[0] == 0

    # +1 link: the redirect back carries the token, so do the links
    for n in (1, 2, 3):
        click(browser, "inc", n)
    assert TOKEN in browser.current_url
    assert TOKEN in browser.find_element(By.ID, "inc").get_attribute("href")
    assert browser.get_cookies() == []  # the browser really kept no cookie
    redirects = [location for _, location in navigations(browser) if location]
    assert len(redirects) >= 3 and all(TOKEN in location for location in redirects)

    if has_form:  # a form post: its action was rewritten too
        _, primary = click(browser, "inc-post", 4)
    else:
        _, primary = click(browser, "inc", 4)
    survivor = next(s for s in cluster.servers if s != primary)

    cluster.kill(primary)

    assert click(browser, "inc", 5) == (5, survivor)
    # the new token (new primary) is in the links now, and it keeps working
    token = browser.current_url.split(TOKEN, 1)[1]
    assert f"!{survivor}!" in token
    assert click(browser, "inc", 6) == (6, survivor)
    assert browser.get_cookies() == []


@pytest.mark.parametrize("app", list(APPS))
def test_browser_with_cookies_sees_no_token_after_the_first_round_trip(make_cluster,
                                                                         make_browser, app):
    module, has_form = APPS[app]
    cluster = make_cluster(app=module, n=3).start(proxy=True)
    browser = make_browser(cookies=True)
    # The first round trip: the response that creates the session cannot know yet whether
    # this browser keeps cookies, so its URLs carry the token (the demo's first page, Flask's
    # first +1 redirect). The browser comes back with the cookie and a URL with the token:
    # it is redirected to that URL without it.
    browser.get(cluster.proxy_url + "/")
    click(browser, "inc", 1)
    first = navigations(browser)
    assert any(TOKEN in url for url, _ in first)
    assert any(location and TOKEN not in location for url, location in first
               if url.startswith(cluster.proxy_url))  # the redirect that took it out
    assert [c["name"] for c in browser.get_cookies()] == ["JSESSIONID"]
    token_free(browser)

    # From then on, no URL anywhere carries it: links, redirects, forms, a failover.
    for n in (2, 3):
        click(browser, "inc", n)
        token_free(browser)
    if has_form:
        _, primary = click(browser, "inc-post", 4)
        token_free(browser)
        browser.find_element(By.LINK_TEXT, "log in as alice").click()  # a link to JSON
        WebDriverWait(browser, 15).until(lambda d: "alice" in d.page_source)
        token_free(browser)
        browser.back()
        WebDriverWait(browser, 15, ignored_exceptions=(NoSuchElementException,)).until(
            lambda d: d.find_element(By.ID, "count"))
        browser.refresh()  # (the page as it is now: its user, from the server)
        assert browser.find_element(By.ID, "user").text == "alice"
    else:
        _, primary = click(browser, "inc", 4)
    token_free(browser)
    survivor = next(s for s in cluster.servers if s != primary)

    cluster.kill(primary)

    assert click(browser, "inc", 5) == (5, survivor)
    token_free(browser)
    cookie = browser.get_cookie("JSESSIONID")
    assert cookie is not None and f"!{survivor}!" in cookie["value"]
    assert click(browser, "inc", 6) == (6, survivor)
    token_free(browser)

    seen = navigations(browser)
    assert len(seen) >= 10
    assert not [(url, location) for url, location in seen
                if TOKEN in url or (location and TOKEN in location)]
