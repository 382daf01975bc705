"""The chat page in a real browser: headless Chromium, driven by Selenium, against a real server.

Skipped unless Chromium and its driver are installed
(Debian: `apt-get install chromium chromium-driver`) and `selenium` is importable.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'gptforge[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'gptforge[serve]'")
httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install selenium")

from gptforge.checkpoint import ClassifierSettings, RunMeta, save_model  # noqa: E402
from gptforge.config import GPTConfig  # noqa: E402
from gptforge.model import GPTModel  # noqa: E402
from gptforge.serve.app import background_server, create_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
    pytest.skip("Chromium and chromedriver are not installed "
                "(Debian: apt-get install chromium chromium-driver)", allow_module_level=True)

CFG = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
API_KEY = "browser-key"


class SlowModel(GPTModel):
    """40 ms per forward pass, so the page is caught while text is still streaming in."""

    def forward(self, idx, cache=None, positions=None, logits_at=None):
        time.sleep(0.04)
        return super().forward(idx, cache, positions, logits_at)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-models")
    torch.manual_seed(0)
    model = SlowModel(CFG)
    model.out_head = nn.Linear(CFG.emb_dim, 2)
    save_model(model, root / "tiny-clf", RunMeta(model=CFG, task="classifier",
                                                 classifier=ClassifierSettings(["ham", "spam"])))
    lm, lm2 = SlowModel(CFG), SlowModel(CFG)  # one model per server: each has its own engine
    lm2.load_state_dict(lm.state_dict())
    with background_server(create_app(lm, root / "tiny-clf", model_id="tiny-lm")) as url, \
            background_server(create_app(lm2, model_id="tiny-lm", api_key=API_KEY)) as keyed_url:
        yield url, keyed_url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("the page did not get there in time")


def set_field(driver, element_id: str, value: str) -> None:
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(value)


def test_chat_and_classify_in_the_page(servers, browser, tmp_path):
    url, _ = servers
    browser.get(url + "/")
    wait_until(lambda: "tiny-lm" in browser.find_element("id", "status").text)
    assert browser.find_element("id", "classify-box").is_displayed()
    assert not browser.find_element("id", "key-box").is_displayed()

    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", "30")
    set_field(browser, "prompt", "Name a colour.")
    browser.find_element("id", "send").click()

    # Text shows up while the answer is still streaming, then the answer completes.
    streaming = ".msg.assistant.streaming"
    partial = wait_until(lambda: [b.text for b in browser.find_elements("css selector", streaming)
                                  if b.text.strip()])
    assert partial
    wait_until(lambda: browser.find_elements("css selector", ".msg.assistant.done"))
    expected = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0,
        "max_tokens": 30, "top_p": 0.9}).json()["choices"][0]["message"]["content"]
    conversation = browser.execute_script("return history")  # what the page will send next
    assert conversation == [{"role": "user", "content": "Name a colour."},
                            {"role": "assistant", "content": expected}]
    assert browser.find_elements("css selector", ".msg.user")[0].text == "Name a colour."

    set_field(browser, "classify-text", "WINNER! Claim your free prize now")
    browser.find_element("id", "classify-btn").click()
    label = wait_until(lambda: browser.find_elements("id", "classify-label"))[0]
    assert label.text in ("ham", "spam")
    assert "%" in browser.find_element("id", "classify-result").text

    shot = tmp_path / "serve-page.png"
    assert browser.save_screenshot(str(shot))
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    browser.find_element("id", "reset").click()
    assert not browser.find_elements("css selector", ".msg")


def test_page_asks_for_the_api_key(servers, browser):
    _, keyed_url = servers
    browser.get(keyed_url + "/")
    wait_until(lambda: browser.find_element("id", "key-box").is_displayed())
    assert not browser.find_element("id", "classify-box").is_displayed()

    set_field(browser, "max-tokens", "3")
    set_field(browser, "prompt", "Hello")
    browser.find_element("id", "send").click()
    error = wait_until(lambda: browser.find_elements("css selector", ".msg.error"))[0]
    assert "API key" in error.text

    set_field(browser, "api-key", API_KEY)
    set_field(browser, "prompt", "Hello")
    browser.find_element("id", "send").click()
    wait_until(lambda: browser.find_elements("css selector", ".msg.assistant.done"))
