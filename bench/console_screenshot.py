"""Makes docs/console.png: a `meshllm serve` of the demo model on 3 stages under a light, changing load
for a minute or so, its console opened in headless Chromium, one chat message sent from the page, and
a screenshot of the page.

    .venv/bin/python bench/console_screenshot.py --out docs/console.png

Needs Debian's chromium and chromium-driver, and selenium (the dev extra). Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from bench_common import free_port
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

READY = re.compile(r"API ready at (http://127\.0\.0\.1:\d+)/v1")
PROMPTS = ["Tell me about the sea.", "What is a pipeline?", "Write a line of Python.", "Hello! How are you?"]
BROWSER_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def start_serve(model: str, stages: int) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "meshllm", "serve", "--model", model, "--stages", str(stages)]
    serve = subprocess.Popen(
        [*command, "--port", str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert serve.stdout is not None
    for line in serve.stdout:
        print(line, end="", file=sys.stderr)
        match = READY.search(line)
        if match:
            threading.Thread(target=lambda: [None for _ in serve.stdout or ()], daemon=True).start()
            return serve, match.group(1)
    raise SystemExit(f"meshllm serve exited with {serve.wait()} before it was ready")


def load(url: str, until: float, concurrency: list[int], period: float) -> None:
    """Clients that send chat requests back to back; how many are active changes every `period` s."""

    def client(index: int) -> None:
        started = time.monotonic()
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < until:
                phase = int((time.monotonic() - started) / period) % len(concurrency)
                if index >= concurrency[phase]:
                    time.sleep(0.2)
                    continue
                prompt = PROMPTS[index % len(PROMPTS)]
                http.post(
                    "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 40},
                )

    threads = [threading.Thread(target=client, args=(index,)) for index in range(max(concurrency))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/console.png"))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=75.0, help="how long the load runs")
    parser.add_argument("--size", default="1600,1180", help="the window, in CSS pixels")
    args = parser.parse_args()
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        raise SystemExit("needs chromium and chromedriver: apt-get install chromium chromium-driver")

    serve, url = start_serve(args.model, args.stages)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (*BROWSER_ARGS, f"--window-size={args.size}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        load(url, time.monotonic() + args.seconds, concurrency=[1, 2, 3, 1], period=args.seconds / 5)
        driver.get(f"{url}/")
        time.sleep(1.5)  # one poll of /console/stats (a picture, not a test: no condition to wait for)
        driver.find_element(By.ID, "max-tokens").clear()
        driver.find_element(By.ID, "max-tokens").send_keys("48")
        driver.find_element(By.ID, "chat-input").send_keys("Hello! Which machines am I talking to?")
        driver.find_element(By.ID, "chat-send").click()
        deadline = time.monotonic() + 60
        reply = ".message.assistant"
        while time.monotonic() < deadline:
            states = [e.get_attribute("data-state") for e in driver.find_elements(By.CSS_SELECTOR, reply)]
            if states and states[-1] != "streaming":
                break
            time.sleep(0.1)
        time.sleep(1.5)  # the charts take in the chat's own tokens
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"wrote {args.out}", file=sys.stderr)
    finally:
        driver.quit()
        serve.send_signal(signal.SIGINT)
        serve.wait(timeout=60)


if __name__ == "__main__":
    main()
