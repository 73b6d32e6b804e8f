"""`serve` in a real browser: Debian's chromium + chromium-driver, driven by selenium (headless, offline).

Types a query, waits for the results, plays the first result's audio from /audio/... (readyState >= 2:
the browser has decoded data at the current position), checks that "more like this" replaces the list
with the clip's neighbours, and that a clip chosen in the drop zone finds itself first. Skipped, with
the reason, where chromium or its driver is missing (.ci/run installs both).

    SERVE_SCREENSHOT=docs/serve.png     save the page as it shows the first results (default: tmp dir)
    SERVE_INDEX=demo/index              run against an existing index (e.g. after `make demo`) instead
    SERVE_QUERY="a dog barks ..."       the query typed (default: one that suits the index used)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from serve_helpers import build_library, call, server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory, minilm_path):
    """(base URL, query) of a served index: SERVE_INDEX, or a small library built here."""
    root = tmp_path_factory.mktemp("browser")
    if os.environ.get("SERVE_INDEX"):
        index, query = Path(os.environ["SERVE_INDEX"]).resolve(), "a dog barks in the rain"
    else:
        index, query = build_library(root, minilm_path).index, "tone number 2"
    query = os.environ.get("SERVE_QUERY", query)
    with server("--index", str(index), log=root / "serve.log") as base:
        yield base, query


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must never look anything up
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--mute-audio",
                "--autoplay-policy=no-user-gesture-required", "--window-size=1200,900",
                "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    profile = tmp_path_factory.mktemp("chromium-profile")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def result_ids(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [li.get_attribute("data-id") for li in driver.find_elements(By.CSS_SELECTOR, "#results li.result")]


def test_search_listen_and_more_like_this(site, browser, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    base, query = site
    wait = WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(base + "/")
    box = browser.find_element(By.ID, "q")
    box.send_keys(query)
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: len(result_ids(d)) > 0)
    first_ids = result_ids(browser)
    api = call(base, "GET", f"/api/search?q={query.replace(' ', '+')}&k=10").json()
    assert first_ids == [str(h["id"]) for h in api["results"]]  # the page shows what the API answers
    assert query in browser.find_element(By.ID, "status").text

    items = browser.find_elements(By.CSS_SELECTOR, "#results li.result")
    for item, hit in zip(items, api["results"], strict=True):  # a clip without audio says so
        players = item.find_elements(By.TAG_NAME, "audio")
        if hit["audio"] is None:
            assert not players and "audio unavailable" in item.text
        else:
            assert players[0].get_attribute("src") == base + hit["audio"]
    first = next(item for item, hit in zip(items, api["results"], strict=True) if hit["audio"])
    audio = first.find_element(By.TAG_NAME, "audio")
    assert audio.get_attribute("src").startswith(f"{base}/audio/")
    browser.execute_script("arguments[0].play();", audio)
    wait.until(lambda d: d.execute_script("return arguments[0].readyState;", audio) >= 2)
    assert browser.execute_script("return arguments[0].error;", audio) is None
    browser.execute_script("arguments[0].pause(); arguments[0].currentTime = 0;", audio)
    # every thumbnail loaded (naturalWidth > 0 once a PNG is decoded)
    thumbs_loaded = (
        "return [...document.querySelectorAll('.thumb:not(.none) img')].every(i => i.naturalWidth > 0);"
    )
    wait.until(lambda d: d.execute_script(thumbs_loaded))
    shot = Path(os.environ.get("SERVE_SCREENSHOT") or tmp_path / "serve.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 0

    clicked = first.get_attribute("data-id")
    first.find_element(By.CSS_SELECTOR, "button.more").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("More like"))
    wait.until(lambda d: result_ids(d) and result_ids(d) != first_ids)
    similar = call(base, "GET", f"/api/similar/{api['index']}/{clicked}?k=10").json()
    assert result_ids(browser) == [str(h["id"]) for h in similar["results"]]
    assert clicked not in result_ids(browser)

    # a clip chosen in the drop zone: that very recording comes first
    clip = tmp_path / "query clip.wav"
    clip.write_bytes(call(base, "GET", f"/audio/{api['index']}/{clicked}").body)
    browser.find_element(By.ID, "file").send_keys(str(clip))
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("Like query clip.wav"))
    assert result_ids(browser)[0] == clicked
