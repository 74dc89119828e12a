"""The chat page (scripts/chat_page.html, served at GET /) in a real headless Chromium driven by selenium."""
import json
import shutil
import urllib.request

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.serving import BASE, make_out, running_server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
    pytest.skip(f"the chat page's browser test needs {CHROMIUM} and {CHROMEDRIVER} (Debian's chromium, "
                "chromium-driver)", allow_module_level=True)

WAIT = 15  # seconds; a reply of 8 tokens from the tiny model takes well under one


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return make_out(tmp_path_factory.mktemp("page"))


@pytest.fixture(scope="module")
def server(out):
    with running_server(out, "--lora_weight", "lora_a,lora_b") as (url, _):
        yield url


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,800",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield browser
    browser.quit()


def wait(driver, condition, message):
    try:
        return WebDriverWait(driver, WAIT).until(condition)
    except TimeoutException:
        raise AssertionError(f"{message}; the page says: {driver.find_element(By.TAG_NAME, 'body').text!r}")


def open_page(driver, url):
    driver.get(url + "/")
    wait(driver, lambda d: len(Select(d.find_element(By.ID, "model-a")).options) > 0
         or d.find_elements(By.CSS_SELECTOR, "#status.error"), "the model list did not load")


def set_field(driver, element_id, value):
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def replies(driver, column):
    """The text of each reply in column 'a' or 'b' once every reply there has finished streaming."""
    selector = f"#column-{column} .reply"
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, selector) and all(
        r.get_attribute("data-done") == "true" for r in d.find_elements(By.CSS_SELECTOR, selector)),
         f"column {column}'s reply did not finish")
    return [r.find_element(By.CLASS_NAME, "text").get_property("textContent")
            for r in driver.find_elements(By.CSS_SELECTOR, selector)]


def api_reply(url, model, prompt, key=None):
    """The non-streaming reply from the API itself, as the page asks for it (temperature 0, 8 tokens)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 8}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        return json.load(response)["choices"][0]["message"]["content"]


def test_lists_the_models_in_both_selects(driver, server):
    open_page(driver, server)
    a, b = Select(driver.find_element(By.ID, "model-a")), Select(driver.find_element(By.ID, "model-b"))
    assert [o.get_attribute("value") for o in a.options] == [BASE, "lora_a", "lora_b"]
    assert [o.get_attribute("value") for o in b.options] == ["", BASE, "lora_a", "lora_b"]
    assert b.options[0].text == "(none)"
    assert a.options[1].text == f"lora_a (adapter of {BASE})"
    # Defaults: the base in A, no comparison (column B hidden).
    assert a.first_selected_option.get_attribute("value") == BASE
    assert b.first_selected_option.get_attribute("value") == ""
    assert not driver.find_element(By.ID, "column-b").is_displayed()
    assert driver.find_element(By.ID, "temperature").get_attribute("value") == "0"
    assert driver.find_element(By.ID, "max-tokens").get_attribute("value") == "128"


def test_side_by_side_replies_match_the_api(driver, server):
    open_page(driver, server)
    Select(driver.find_element(By.ID, "model-a")).select_by_value("lora_a")
    Select(driver.find_element(By.ID, "model-b")).select_by_value(BASE)
    set_field(driver, "temperature", 0)
    set_field(driver, "max-tokens", 8)
    prompt = "你好, who are you?"
    set_field(driver, "prompt", prompt)
    driver.find_element(By.ID, "send").click()

    got_a, got_b = replies(driver, "a"), replies(driver, "b")
    assert driver.find_element(By.ID, "column-b").is_displayed()
    assert "lora_a" in driver.find_element(By.CSS_SELECTOR, "#column-a h2").text
    assert BASE in driver.find_element(By.CSS_SELECTOR, "#column-b h2").text
    for column in "ab":
        assert [u.text for u in driver.find_elements(By.CSS_SELECTOR, f"#column-{column} .user")] == [prompt]
        assert "finish_reason: length" in driver.find_element(By.CSS_SELECTOR, f"#column-{column} .reply .meta").text
        assert not driver.find_elements(By.CSS_SELECTOR, f"#column-{column} .error")
    assert got_a == [api_reply(server, "lora_a", prompt)]
    assert got_b == [api_reply(server, BASE, prompt)]
    assert got_a != got_b, "the adapter should change the reply"

    # Shift+Enter is a new line; Enter alone sends the next turn; Clear empties both conversations.
    set_field(driver, "prompt", "again")
    driver.find_element(By.ID, "prompt").send_keys(Keys.SHIFT, Keys.ENTER, Keys.NULL, "and again")
    assert driver.find_element(By.ID, "prompt").get_property("value") == "again\nand again"
    assert len(driver.find_elements(By.CSS_SELECTOR, "#column-a .user")) == 1
    driver.find_element(By.ID, "prompt").send_keys(Keys.ENTER)
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#column-b .reply")) == 2, "Enter did not send")
    assert len(replies(driver, "a")) == 2 and len(replies(driver, "b")) == 2
    driver.find_element(By.ID, "clear").click()
    assert not driver.find_elements(By.CSS_SELECTOR, ".user, .reply, .error")


def test_the_event_parser_handles_chunks_split_anywhere(driver, server):
    open_page(driver, server)
    # Events with CRLF, a multi-line data field and a comment, cut into one-byte chunks (splitting "你好" too).
    text = 'data: {"a": "你好"}\r\n\r\n: a comment\ndata: one\ndata: two\n\ndata: [DONE]\n\n'
    got = driver.execute_async_script("""
        const [text, done] = arguments;
        const bytes = new TextEncoder().encode(text);
        const body = new ReadableStream({ start(c) { for (const b of bytes) c.enqueue(new Uint8Array([b])); c.close(); } });
        (async () => { const out = []; for await (const d of serverSentEvents(body)) out.push(d); done(out); })();
    """, text)
    assert got == ['{"a": "你好"}', "one\ntwo", "[DONE]"]


def test_shows_the_server_error_until_the_key_is_given(driver, out):
    with running_server(out, "--api_key", "k") as (url, _):
        open_page(driver, url)  # the key field is empty: /v1/models answers 401
        status = driver.find_element(By.ID, "status")
        assert "error" in status.get_attribute("class") and "API key" in status.text

        set_field(driver, "api-key", "k")  # the page reloads the model list once typing stops
        wait(driver, lambda d: len(Select(d.find_element(By.ID, "model-a")).options) == 1, "the key did not unlock")
        set_field(driver, "max-tokens", 8)
        set_field(driver, "prompt", "hello")
        driver.find_element(By.ID, "send").click()
        assert replies(driver, "a") == [api_reply(url, BASE, "hello", key="k")]
        assert not driver.find_elements(By.CSS_SELECTOR, ".error")

        # A wrong key on a chat request: the 401's message shows up in the column.
        set_field(driver, "api-key", "wrong")
        set_field(driver, "prompt", "hello again")
        driver.find_element(By.ID, "send").click()
        error = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#column-a .error"), "no error was shown")
        assert "API key" in error[0].text and error[0].is_displayed()
        assert len(replies(driver, "a")) == 2
