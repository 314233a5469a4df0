"""The page `bertpipe serve` answers at `/`, in a real headless Chromium (Debian's, driven by Playwright): load it,
type, submit, and check what it shows against the API's own answer — the label with a bar per probability, each
word coloured by its tag, the translation, the server's error, the truncation note.

Each test saves a screenshot of what it checked as `page-<run>.png` in its pytest tmp directory
(`pytest --basetemp=DIR` puts them under DIR/<test name>0/). Chromium is installed with apt-get when missing;
without root or apt the tests skip, except in CI (`CI` set), where they fail.
"""

from __future__ import annotations

import json
import os
import urllib.request

import pytest
from browser import ARGS, Unavailable, chromium

from recipes.serve.server import Running, ServeConfig


@pytest.fixture(scope="module")
def browser():
    try:
        executable = chromium()
    except Unavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"the page tests must run in CI: {err}")
        pytest.skip(f"page tests skipped: {err}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(executable), args=ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def servers(tiny_runs):
    with (Running(ServeConfig(run=str(tiny_runs["sst2"]), port=0)) as sst2,
          Running(ServeConfig(run=str(tiny_runs["ud_pos"]), port=0)) as pos,
          Running(ServeConfig(run=str(tiny_runs["multi30k"]), port=0)) as translation):
        yield {"sst2": sst2, "ud_pos": pos, "multi30k": translation}


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 900, "height": 700})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def api(url: str, text: str) -> dict:
    request = urllib.request.Request(url + "/predict", data=json.dumps({"inputs": text}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["results"][0]


def open_page(page, url: str, title: str) -> None:
    page.goto(url + "/")
    page.wait_for_function(f"document.getElementById('title').textContent === {json.dumps(title)}")
    assert page.locator("#submit").is_enabled()


def test_the_label_and_a_bar_per_probability(page, servers, tmp_path):
    url, text = servers["sst2"], "a gorgeous , witty , seductive movie ."
    open_page(page, url, "sst2 · classify")
    assert "bert tiny" in page.locator("#about").text_content()
    page.fill("#field-text", text)
    page.click("#submit")
    page.wait_for_selector("#label")
    want = api(url, text)
    assert page.locator("#label").text_content() == f"{want['label']} ({want['probability']:.3f})"
    for label, p in want["probabilities"].items():
        row = page.locator(f".row[data-label='{label}']")
        assert row.locator(".name").text_content() == label
        assert row.locator(".value").text_content() == f"{p:.3f}"
        bar, fill = row.locator(".bar").bounding_box(), row.locator(".fill").bounding_box()
        assert fill["width"] / bar["width"] == pytest.approx(p, abs=0.01)  # the bar is drawn to scale
        assert ("top" in row.get_attribute("class")) == (label == want["label"])
    assert not page.locator("#truncated").count() and page.locator("#error").is_hidden()
    page.screenshot(path=str(tmp_path / "page-sst2.png"), full_page=True)
    assert (tmp_path / "page-sst2.png").stat().st_size > 5_000

    page.fill("#field-text", " ".join([text] * 40))  # past the run's 64 pieces
    page.click("#submit")
    page.wait_for_selector("#truncated")
    assert "64 pieces" in page.locator("#truncated").text_content()


def test_each_word_coloured_by_its_tag(page, servers, tmp_path):
    url, text = servers["ud_pos"], "The old man quickly sold three red boats in Boston yesterday."
    open_page(page, url, "ud_pos · tag")
    page.fill("#field-text", text)
    page.press("#field-text", "Control+Enter")  # the shortcut submits too
    page.wait_for_selector("#tagged .word")
    want = api(url, text)
    words = page.locator("#tagged .word")
    assert words.count() == len(want["words"])
    colours: dict[str, str] = {}
    for i, (word, tag) in enumerate(zip(want["words"], want["tags"], strict=True)):
        span = words.nth(i)
        assert span.get_attribute("data-tag") == tag and span.locator("sub").text_content() == tag
        assert span.text_content() == word + tag  # the word, then its tag as a subscript
        colour = span.evaluate("e => getComputedStyle(e).backgroundColor")
        assert colours.setdefault(tag, colour) == colour  # one colour per tag ...
        assert colour != "rgba(0, 0, 0, 0)"
    assert len(set(colours.values())) == len(colours) > 1  # ... and a different one for each
    legend = page.locator("#legend span").all_text_contents()
    assert sorted(legend) == sorted(set(want["tags"]))
    page.screenshot(path=str(tmp_path / "page-ud_pos.png"), full_page=True)


def test_the_translation(page, servers, tmp_path):
    url, text = servers["multi30k"], "A man rides a bike down the street."
    open_page(page, url, "multi30k · translate")
    page.fill("#field-text", text)
    page.click("#submit")
    page.wait_for_selector("#translation")
    assert page.locator("#translation").text_content() == api(url, text)["translation"]
    page.screenshot(path=str(tmp_path / "page-multi30k.png"), full_page=True)


def test_the_servers_error_then_an_answer(page, servers):
    open_page(page, servers["sst2"], "sst2 · classify")
    page.fill("#field-text", "   ")
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    assert page.locator("#error").text_content() == "inputs: empty text"
    assert not page.locator("#label").count()
    page.fill("#field-text", "a dull mess .")
    page.click("#submit")
    page.wait_for_selector("#label")
    assert page.locator("#error").is_hidden()
