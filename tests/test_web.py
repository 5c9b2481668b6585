"""The chat page in real headless Chromium (Debian's, driven by Playwright): load, send, streamed text,
Markdown, stop, new chat, Chinese input and IME composition.

Needs `apt-get install -y chromium fonts-noto-cjk` and `pip install playwright` (never `playwright install`).
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from qianwen.server import ServerConfig, create_app

from ._server_fixtures import ThreadServer, load_tiny

CHROMIUM = os.environ.get("QIANWEN_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
ANSWER = "Here is **bold** text and code:\n\n```python\nprint(1 + 1)\n```\n\n你好，世界。"

# CI installs both (dev.sh test); elsewhere the browser test is skipped with the install line
if os.environ.get("CI"):
    import playwright.sync_api as sync_api  # noqa: F401  (a missing browser stack fails CI loudly)
else:
    sync_api = pytest.importorskip("playwright.sync_api")
if not shutil.which(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium fonts-noto-cjk)", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tiny_qwen2_dir):
    model = load_tiny(tiny_qwen2_dir, "float32")
    app = create_app(model, config=ServerConfig(model_name="tiny"))
    tok = model.tokenizer
    state = {"ids": tok.encode(ANSWER), "delay": 0.0}
    end = tok.token_to_id("<|im_end|>")

    def scripted(prompt_ids, output_ids, logits):  # the model "writes" ANSWER, at a chosen pace
        import torch

        time.sleep(state["delay"])
        ids = state["ids"]
        out = torch.full_like(logits, float("-inf"))
        out[ids[len(output_ids)] if len(output_ids) < len(ids) else end] = 0.0
        return out

    app.state.serving.logits_processors = [scripted]
    with ThreadServer(app) as s:
        s.state = state
        yield s


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(server.base + "/")
        page.wait_for_function("document.getElementById('model-name').textContent === 'tiny'")
        yield page
        browser.close()


def test_send_and_see_streamed_markdown(page, server, tmp_path):
    server.state["delay"] = 0.0
    page.fill("#input", "Show me some code")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.user >> text=Show me some code")
    page.wait_for_selector(".msg.assistant pre code", timeout=30000)
    page.wait_for_function("!document.querySelector('.msg.assistant.streaming')", timeout=30000)
    body = page.locator(".msg.assistant .body").last
    assert body.locator("strong").inner_text() == "bold"
    assert body.locator("pre code").inner_text() == "print(1 + 1)"
    assert "你好，世界。" in body.inner_text()
    assert page.is_visible("#send") and not page.is_visible("#stop")
    page.screenshot(path=str(tmp_path / "chat.png"))


def test_stop_ends_the_stream_and_frees_the_slot(page, server):
    import httpx

    from ._server_fixtures import metric

    server.state["delay"] = 0.15  # slow enough to press Stop mid-answer
    page.fill("#input", "A long answer please")
    page.press("#input", "Enter")
    page.wait_for_function("(document.querySelector('.msg.assistant.streaming .body') || {}).textContent"
                           " && document.querySelector('.msg.assistant.streaming .body').textContent.length > 3",
                           timeout=30000)
    assert page.is_visible("#stop")
    page.click("#stop")
    page.wait_for_selector("#send", state="visible")
    text = page.locator(".msg.assistant .body").last.inner_text()
    assert 0 < len(text) < len(ANSWER)
    time.sleep(0.5)
    assert page.locator(".msg.assistant .body").last.inner_text() == text  # nothing more arrives
    deadline = time.time() + 20
    while metric(httpx.get(server.base + "/metrics").text, "qianwen_running_sequences") != 0:
        assert time.time() < deadline
        time.sleep(0.1)


def test_enter_while_composing_does_not_send(page, server):
    server.state["delay"] = 0.0
    before = page.locator(".msg.user").count()
    page.fill("#input", "ni hao")
    page.dispatch_event("#input", "keydown", {"key": "Enter", "isComposing": True, "keyCode": 229})
    page.wait_for_timeout(300)
    assert page.locator(".msg.user").count() == before
    assert page.input_value("#input") == "ni hao"
    page.fill("#input", "你好")  # the composed text, then a real Enter
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.user >> text=你好")
    page.wait_for_function("!document.querySelector('.msg.assistant.streaming')", timeout=30000)


def test_new_chat_clears_history(page):
    assert page.locator(".msg").count() > 0
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
