"""The web console in a real headless Chromium, against a real 2-stage `meshllm serve` with an API key:
the page shows both devices and the layer bar, asks for the key, streams a chat reply, stops one, and turns
a killed worker's card to unreachable within 5 s.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). With MESHLLM_CONSOLE_SCREENSHOT
set to a path, the test saves a screenshot of the page there (docs/console.png comes from
bench/console_screenshot.py, which puts some load on the cluster first).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_helpers import wait_until
from test_serve_cli import Serve, free_port, pid_exists

from meshllm.engines import default_engine

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
API_KEY = "console-test-key"
UNREACHABLE_WITHIN = 5.0  # seconds from SIGKILL to the card saying so

# Nothing but 127.0.0.1: every other name fails to resolve, and the browser's own background traffic
# (updates, sync, safe browsing) is off.
BROWSER_ARGS = (
    "--headless=new",
    "--no-sandbox",  # the tests may run as root
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--window-size=1680,1050",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
)


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs chromium and chromedriver: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in BROWSER_ARGS:
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def by_css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def attribute(driver: Any, selector: str, name: str) -> str | None:
    """An attribute of the first element matching `selector`, read in the page (None when there is none)."""
    script = (
        "const node = document.querySelector(arguments[0]); return node && node.getAttribute(arguments[1]);"
    )
    return driver.execute_script(script, selector, name)  # type: ignore[no-any-return]


def text(driver: Any, selector: str) -> str:
    script = "const node = document.querySelector(arguments[0]); return node ? node.textContent : '';"
    return driver.execute_script(script, selector)  # type: ignore[no-any-return]


def restarted_pids(serve: Serve) -> list[int]:
    return [int(pid) for pid in re.findall(r"started worker\d+ again \(pid (\d+)\)", serve.output)]


def test_console_shows_the_cluster_streams_a_chat_and_marks_a_killed_worker(
    browser: Any, tiny_checkpoint: Callable[..., Path]
) -> None:
    checkpoint = tiny_checkpoint(arch="qwen3", layers=4)
    serve = Serve(
        "--model", str(checkpoint), "--stages", "2", "--port", str(free_port()), "--api-key", API_KEY
    )  # fmt: skip
    try:
        url = serve.wait_ready()
        [worker_pid] = serve.worker_pids()
        browser.get(f"{url}/")

        # Without the key: the devices and the plan (what /distributed/gpu-info shows), and the key asked.
        assert wait_until(lambda: len(by_css(browser, "#devices .device")) == 2, 30), browser.page_source
        cards = by_css(browser, "#devices .device")
        assert [card.get_attribute("data-name") for card in cards] == ["coordinator", "worker1"]
        assert wait_until(
            lambda: (
                [card.get_attribute("data-status") for card in by_css(browser, "#devices .device")]
                == ["healthy", "healthy"]
            ),
            30,
        )
        assert f"{default_engine()} · cpu" in text(browser, '.device[data-name="worker1"]')
        segments = by_css(browser, "#layer-bar .segment")
        assert [segment.get_attribute("data-name") for segment in segments] == ["coordinator", "worker1"]
        assert [segment.text.split("\n")[-1] for segment in segments] == ["0–2", "2–4"]
        assert text(browser, "#layer-count") == "(4 in all)"
        assert by_css(browser, "#key-panel")[0].is_displayed()
        assert by_css(browser, "#chat-send")[0].get_attribute("disabled") is not None

        # A wrong key is refused; the right one opens the charts and the chat.
        by_css(browser, "#key-input")[0].send_keys("not-the-key")
        by_css(browser, "#key-submit")[0].click()
        assert wait_until(lambda: "refused" in text(browser, "#key-error"), 10)
        by_css(browser, "#key-input")[0].clear()
        by_css(browser, "#key-input")[0].send_keys(API_KEY)
        by_css(browser, "#key-submit")[0].click()
        assert wait_until(lambda: not by_css(browser, "#key-panel")[0].is_displayed(), 10)
        assert text(browser, "#chat-model") == checkpoint.name
        assert wait_until(lambda: by_css(browser, "#chat-send")[0].get_attribute("disabled") is None, 10)

        # A greedy chat from the page streams the same reply as the API gives for the same request.
        for selector, value in (("#temperature", "0"), ("#max-tokens", "12")):
            field = by_css(browser, selector)[0]
            field.clear()
            field.send_keys(value)
        by_css(browser, "#chat-input")[0].send_keys("Hello!")
        by_css(browser, "#chat-send")[0].click()
        reply = ".message.assistant"
        assert wait_until(lambda: attribute(browser, reply, "data-state") not in (None, "streaming"), 90)
        assert attribute(browser, reply, "data-state") == "done", text(browser, reply)
        expected = httpx.post(
            f"{url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 12, "temperature": 0},
            timeout=60,
        ).json()["choices"][0]["message"]["content"]
        assert text(browser, f"{reply} .content") == expected
        assert int(attribute(browser, reply, "data-chunks") or 0) > 1, "the reply came in one piece"
        assert "12 tokens" in text(browser, f"{reply} .info")

        # Stop ends a long reply early, and the server lets go of its sequence. (Greedy, this prompt runs
        # to the token limit: nothing but the button ends it.)
        long_reply = httpx.post(
            f"{url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 400, "temperature": 0},
            timeout=120,
        ).json()
        assert long_reply["choices"][0]["finish_reason"] == "length"
        by_css(browser, "#chat-clear")[0].click()
        assert not by_css(browser, "#chat-log .message")
        field = by_css(browser, "#max-tokens")[0]
        field.clear()
        field.send_keys("400")
        by_css(browser, "#chat-input")[0].send_keys("Hello!")
        by_css(browser, "#chat-send")[0].click()
        assert wait_until(lambda: int(attribute(browser, reply, "data-chunks") or 0) >= 1, 60)
        by_css(browser, "#chat-stop")[0].click()
        assert wait_until(lambda: attribute(browser, reply, "data-state") != "streaming", 10)
        assert attribute(browser, reply, "data-state") == "stopped"
        stopped_text = text(browser, f"{reply} .content")
        assert long_reply["choices"][0]["message"]["content"].startswith(stopped_text)
        assert len(stopped_text) < len(long_reply["choices"][0]["message"]["content"])
        assert wait_until(
            lambda: httpx.get(f"{url}/distributed/gpu-info", timeout=10).json()["live_sequences"] == 0, 10
        )

        # The charts plot what was generated (the series end at the last whole second).
        assert wait_until(lambda: bool(by_css(browser, "#chart-tokens path")), 10)
        assert wait_until(lambda: bool(by_css(browser, "#chart-ttft path, #chart-ttft circle")), 10)
        assert "worker1" in text(browser, "#steps-legend")
        screenshot = os.environ.get("MESHLLM_CONSOLE_SCREENSHOT")
        if screenshot:
            browser.save_screenshot(screenshot)

        # A killed worker's card turns unreachable (serve starts it again afterwards: that is fine).
        os.kill(worker_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        worker_card = '.device[data-name="worker1"]'
        assert wait_until(
            lambda: attribute(browser, worker_card, "data-status") == "unreachable", UNREACHABLE_WITHIN
        ), (attribute(browser, worker_card, "data-status"), text(browser, worker_card))
        print(f"worker1 unreachable on the page {time.monotonic() - killed_at:.2f} s after SIGKILL")
        assert text(browser, "#cluster-status") == "degraded"
        assert "down" in (attribute(browser, '#layer-bar .segment[data-name="worker1"]', "class") or "")
        assert serve.stop(signal.SIGINT) == 0, serve.output
    finally:
        serve.kill()
        for pid in restarted_pids(serve):
            if pid_exists(pid):
                os.kill(pid, signal.SIGKILL)
