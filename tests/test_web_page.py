"""The server's page in a real browser: headless Chromium driven by Selenium against
``glm-image serve --model tiny`` (random weights: the images are noise, the flow is real).

It types a prompt, generates, watches the AR and then the DiT numbers advance, sees the image and
its PNG parameters, downloads it (bytes equal to ``/files/...``), edits with the result as the
condition image, triggers a size error (the API's message, shown as it is), cancels a long
request (the server idle again, the engine call stopped), and uses an API key. Every request
the page makes is recorded (Chromium's performance log) and must go to the server; the page's
console must stay free of errors.

Marker ``browser``: runs only with ``-m browser`` (a CI step of its own, after the Ray one, which
installs the ``web-test`` extra and the distribution's ``chromium`` and ``chromium-driver``).
Chromium and its driver are the distribution's, named by path: never a Selenium Manager download.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.browser

webdriver = pytest.importorskip(
    "selenium.webdriver",
    reason='the browser test needs the web-test extra: pip install -e ".[test,web-test]"',
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
KEY = "page-test-key"
# The page polls progress every 250 ms: the tiny DiT at 256x256 takes a few 100 ms per 100 steps
# on an idle CPU, so with the most steps a request may ask for, polls land in the DiT stage.
SIDE, STEPS = 256, 200


@pytest.fixture(scope="module", autouse=True)
def _only_when_asked(request):  # module scope: decided before the server and the browser start
    if "browser" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("runs only with -m browser (a CI step of its own: it starts Chromium)")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            pytest.skip(f"{path} is missing: apt-get install -y chromium chromium-driver ({package})")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``glm-image serve --model tiny`` in a process of its own, with an API key: (url, files)."""
    out = tmp_path_factory.mktemp("web") / "files"
    port = free_port()
    command = [sys.executable, "-m", "glm_image.cli", "serve", "--model", "tiny", "--port", str(port)]
    command += ["--output-dir", str(out), "--steps", "4", "--api-key-env", "GLM_IMAGE_TEST_KEY"]
    env = {**os.environ, "GLM_IMAGE_TEST_KEY": KEY}
    log = tmp_path_factory.mktemp("web-log") / "serve.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, log.read_text()
        with contextlib.suppress(requests.ConnectionError):
            return requests.get(url + "/health", timeout=2).status_code == 200
        return False

    try:
        wait_until(up, 300, "the server to start")
        yield url, out
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(tmp_path_factory, downloads):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,1100",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield driver
    finally:
        driver.quit()


def api(url: str, method: str, path: str, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
    return requests.request(method, url + path, headers=headers, timeout=60, **kwargs)


def metric(url: str, name: str) -> float:
    text = api(url, "GET", "/metrics").text
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def text_of(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def visible(driver, element_id: str) -> bool:
    return driver.find_element(By.ID, element_id).is_displayed()


def fill(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def numbers(text: str) -> tuple[int, int] | None:
    match = re.fullmatch(r"(\d+) / (\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def generate_and_watch(driver, timeout: float = 240) -> list[tuple]:
    """Click Generate and sample the two progress readouts until the request ends."""
    driver.find_element(By.ID, "generate").click()
    samples, deadline = [], time.monotonic() + timeout
    while True:
        status = text_of(driver, "status")
        both = driver.execute_script(  # one read of both: the page may update between two reads
            "return [document.getElementById('ar-text').textContent,"
            " document.getElementById('dit-text').textContent]"
        )
        samples.append((numbers(both[0]), numbers(both[1])))
        if status.startswith(("Done", "The server refused", "Cancelled")) or visible(driver, "error"):
            return samples
        assert time.monotonic() < deadline, f"no answer in {timeout} s; status {status!r}"
        time.sleep(0.05)


def test_the_page_end_to_end(server, browser, downloads, tmp_path):
    url, out = server
    driver = browser
    driver.get(url + "/")

    # --- the API key: asked for, a wrong one refused with the API's message, then kept
    wait_until(lambda: visible(driver, "key-panel"), 30, "the key panel")
    assert "missing API key" in text_of(driver, "key-message")
    assert not driver.find_element(By.ID, "generate").is_enabled()
    fill(driver, "api-key", "wrong")
    driver.find_element(By.ID, "api-key").send_keys(Keys.ENTER)
    wait_until(lambda: "invalid API key" in text_of(driver, "key-message"), 30, "the bad-key message")
    fill(driver, "api-key", KEY)
    driver.find_element(By.ID, "key-save").click()
    wait_until(lambda: text_of(driver, "model") == "model: tiny", 30, "the config")
    assert not visible(driver, "key-panel")
    assert driver.execute_script("return sessionStorage.getItem('glm-image-api-key')") == KEY

    # --- a generation: the counter, the custom size, a fixed seed; progress AR then DiT
    prompt = 'a red "glm" sign ✓'
    driver.find_element(By.ID, "prompt").send_keys(prompt)
    assert text_of(driver, "prompt-count") == f"{len(prompt)} / 1000 characters"
    Select(driver.find_element(By.ID, "size-preset")).select_by_value("custom")
    fill(driver, "width", str(SIDE))
    fill(driver, "height", str(SIDE))
    fill(driver, "steps", str(STEPS))
    driver.find_element(By.ID, "seed-fixed").click()
    fill(driver, "seed", "7")
    samples = generate_and_watch(driver)
    assert text_of(driver, "status").startswith("Done"), (text_of(driver, "status"), text_of(driver, "error"))
    ar = [a for a, _ in samples if a is not None]
    dit = [(a, d) for a, d in samples if d is not None]
    assert len({a[0] for a in ar if a[0] < a[1]}) >= 2, f"the AR count never advanced: {samples}"
    assert [a[0] for a in ar] == sorted(a[0] for a in ar)
    assert dit, f"no DiT step was shown: {samples}"
    assert all(a[0] == a[1] for a, _ in dit), f"DiT numbers before the AR stage ended: {samples}"
    assert all(d[1] == STEPS for _, d in dit) and [d[0] for _, d in dit] == sorted(d[0] for _, d in dit)
    assert samples.index(dit[0]) > samples.index(next(s for s in samples if s[0] is not None))

    # --- the image, its PNG parameters, the screenshot
    image = driver.find_element(By.ID, "result-image")
    assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == SIDE
    params = dict(
        zip(
            [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#result-params dt")],
            [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#result-params dd")],
            strict=True,
        )
    )
    assert params["prompt"] == prompt and params["seed"] == "7"
    assert params["size"] == f"{SIDE}x{SIDE}" and params["steps"] == str(STEPS) and params["model"] == "tiny"
    driver.save_screenshot(str(tmp_path / "web-page.png"))
    assert (tmp_path / "web-page.png").stat().st_size > 10_000

    # --- download: the same bytes as /files/<id>.png and as the file the server wrote
    link = driver.find_element(By.ID, "download")
    file_url = link.get_attribute("href")
    assert re.fullmatch(re.escape(url) + r"/files/[0-9a-f]{32}\.png", file_url), file_url
    link.click()
    saved = downloads / "glm-image-7.png"
    wait_until(lambda: saved.exists() and not list(downloads.glob("*.crdownload")), 30, "the download")
    served = requests.get(file_url, timeout=30).content
    assert saved.read_bytes() == served == (out / file_url.rsplit("/", 1)[1]).read_bytes()

    # --- the gallery shows it; "use as condition image" then an edit
    wait_until(
        lambda: (
            file_url
            in [e.get_attribute("src") for e in driver.find_elements(By.CSS_SELECTOR, "#gallery img")]
        ),
        30,
        "the gallery",
    )
    driver.find_element(By.ID, "use-condition").click()
    wait_until(lambda: visible(driver, "condition-preview"), 30, "the condition image")
    assert driver.execute_script("return document.getElementById('condition').files.length") == 1
    fill(driver, "steps", "2")
    generate_and_watch(driver)
    assert text_of(driver, "status").startswith("Done"), text_of(driver, "error")
    edit_url = driver.find_element(By.ID, "download").get_attribute("href")
    assert edit_url != file_url
    driver.find_element(By.ID, "condition-clear").click()
    assert not visible(driver, "condition-preview")

    # --- a size error: the API's 400 message, shown as it is
    fill(driver, "width", "100")
    assert "width = 100 is not allowed" in text_of(driver, "size-hint")  # the hint as you type
    generate_and_watch(driver)
    body = {"prompt": prompt, "size": f"100x{SIDE}", "steps": 2, "guidance": 1.5, "n": 1, "seed": 7}
    refused = api(url, "POST", "/v1/images/generations", json=body)
    assert refused.status_code == 400
    assert text_of(driver, "error") == refused.json()["error"]["message"]
    assert "size" in text_of(driver, "error")
    fill(driver, "width", str(SIDE))

    # --- cancel a long request: the engine call stops, the server is idle again
    stopped = metric(url, "glm_image_engine_calls_stopped_total")
    made = metric(url, "glm_image_images_generated_total")
    Select(driver.find_element(By.ID, "size-preset")).select_by_value("custom")
    fill(driver, "width", "1024")
    fill(driver, "height", "1024")
    fill(driver, "steps", "200")
    driver.find_element(By.ID, "generate").click()
    wait_until(
        lambda: (n := numbers(text_of(driver, "ar-text"))) and n[0] > 0, 120, "the long request to run"
    )
    assert api(url, "GET", "/health").json()["running"] == 1
    driver.find_element(By.ID, "cancel").click()
    wait_until(lambda: text_of(driver, "status").startswith("Cancelled"), 30, "the page to say so")
    wait_until(lambda: api(url, "GET", "/health").json()["running"] == 0, 60, "the server to be idle")
    assert api(url, "GET", "/health").json()["queue_depth"] == 0
    assert metric(url, "glm_image_engine_calls_stopped_total") == stopped + 1
    assert metric(url, "glm_image_images_generated_total") == made
    assert driver.find_element(By.ID, "generate").is_enabled()

    # --- nothing but this server was asked for anything, and the console has no errors
    requested, by_page = [], []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            sent = message["params"]["request"]["url"]
            requested.append(sent)
            if message["params"].get("documentURL", "").startswith(url + "/"):
                by_page.append(sent)
    own = (url + "/", f"blob:{url}/", "data:")
    assert not [u for u in by_page if not u.startswith(own)]
    # and nothing went to the network anywhere else (the browser's own chrome:// pages aside)
    assert not [u for u in requested if re.match(r"(https?|wss?|ftp):", u) and not u.startswith(own)]
    requested = by_page
    for path in (
        "/v1/web/config",
        "/v1/progress/",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/files",
    ):
        assert any(u.startswith(url + path) for u in requested), path
    problems = []
    for entry in driver.get_log("browser"):
        if entry["level"] not in ("SEVERE", "WARNING"):
            continue
        # the browser reports the API's expected refusals (the two 401s, the 400) as failed loads
        expected = entry["source"] == "network" and re.search(r"status of (401|400)", entry["message"])
        if not expected:
            problems.append(entry)
    assert not problems, problems


def test_the_page_at_phone_width_is_labelled_and_keyboard_usable(server, browser):
    url, _ = server
    driver = browser
    driver.set_window_size(390, 844)
    driver.get(url + "/")
    driver.execute_script(f"sessionStorage.setItem('glm-image-api-key', '{KEY}')")
    driver.get_log("browser")  # read away: the first load, without the key, was refused (401)
    driver.get(url + "/")
    wait_until(lambda: text_of(driver, "model") == "model: tiny", 30, "the config")
    # no sideways scrolling at phone width
    wide = driver.execute_script(
        "return [...document.querySelectorAll('body *')]"
        ".filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5)"
        ".map(e => (e.id || e.tagName) + ' ' + e.getBoundingClientRect().right)"
    )
    assert wide == [], (driver.execute_script("return document.documentElement.clientWidth"), wide)
    # every control has a label
    unlabelled = driver.execute_script(
        "return [...document.querySelectorAll('input, select, textarea')]"
        ".filter(e => e.type !== 'hidden' && e.labels.length === 0).map(e => e.id)"
    )
    assert unlabelled == []
    # Tab reaches the prompt, the controls and Generate, in the page's order
    driver.execute_script("document.getElementById('key-toggle').focus()")  # the page's first control
    reached = ["key-toggle"]
    for _ in range(30):
        ActionChains(driver).send_keys(Keys.TAB).perform()  # a key press, wherever the focus is
        reached.append(driver.switch_to.active_element.get_attribute("id"))
    for control in ("key-toggle", "prompt", "size-preset", "steps", "guidance", "condition", "generate"):
        assert control in reached, (control, reached)
    assert reached.index("prompt") < reached.index("generate")
    # Enter in the key toggle opens the key panel: the buttons are real buttons
    driver.find_element(By.ID, "key-toggle").send_keys(Keys.ENTER)
    assert visible(driver, "key-panel")
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
