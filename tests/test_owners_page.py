"""The data owners' page (`GET /`) in a real browser against a real server.

Headless Chromium, driven by Selenium, uses the page as an owner would: paste the text of
one of their restricted documents, see it found with its provenance, sign in with their
owner token, preview and confirm the removal, look the receipt up (with the model's
training tiers), and check the text again to see the document gone. Also: a wrong token
and another owner's document are refused in plain words, the trace step works with the
keyboard alone, pasted markup stays text, and a phone-sized window has no horizontal
scroll. Screenshots of each step are saved under the test's tmp_path (paths printed).

The server is `start_http` over a token store and an ∞-gram store of the restricted tier,
with an admin token and an owner-token file. Without chromium and chromedriver the tests
are skipped, unless SILO_REQUIRE_BROWSER=1 (CI) makes that a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest
from silo.server.app import load_state, make_admission
from silo.server.auth import Auth, OwnerCredentials
from silo.server.http import start_http
from silo.server.limits import Limits

from silo.build import BuildArgs, build_store
from silo.corpus import iter_documents

pytestmark = pytest.mark.slow  # 23-32 s here on 2 shared cores, a cold tiny model and stores included

WINDOW = 128
ADMIN = "page-admin-token-0123456789abcdef"
OWNER, OTHER = "owner-4", "owner-0"  # make_records: owner-{i % 5}; restricted when i % 6 in (4, 5)
WAIT_S = 30


def _browser_paths() -> tuple[str | None, str | None]:
    return (shutil.which("chromium") or _executable("/usr/bin/chromium"),
            shutil.which("chromedriver") or _executable("/usr/bin/chromedriver"))


def _executable(path: str) -> str | None:
    return path if os.access(path, os.X_OK) else None


def _need_browser() -> tuple[str, str]:
    """The chromium and chromedriver binaries; skips (or, under SILO_REQUIRE_BROWSER=1, fails)
    the test when either is missing, or Selenium is."""
    chromium, driver = _browser_paths()
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        why = (f"no {' and no '.join(missing)}: the owners' page needs a real browser "
               "(apt-get install chromium chromium-driver)")
        if os.environ.get("SILO_REQUIRE_BROWSER") == "1":
            pytest.fail(why + "; SILO_REQUIRE_BROWSER=1 makes this a failure")
        pytest.skip(why)
    return chromium, driver


def _build(tiny_model, corpus_dir, out: Path, **kw) -> Path:
    build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(out), tiers=("restricted",),
                          window=WINDOW, stride=WINDOW // 2, progress=False, **kw))
    return out


class Site:
    """A real HTTP server on loopback, an owner's token and two restricted documents."""

    def __init__(self, tiny_model, corpus_dir, tmp: Path):
        stores = [_build(tiny_model, corpus_dir, tmp / "token"),
                  _build(tiny_model, corpus_dir, tmp / "infgram", kind="infgram")]
        self.creds = OwnerCredentials(tmp / "owners.json")
        self.token, _ = self.creds.issue(OWNER)
        self.state = load_state(str(tiny_model), [str(s) for s in stores], limits=Limits(),
                                auth=Auth(ADMIN, self.creds))
        self.http = start_http(self.state, make_admission(limits=self.state.limits), "127.0.0.1", 0)
        self.url = self.http.url + "/"
        with urllib.request.urlopen(self.http.url + "/v1/silo/info", timeout=30) as r:
            self.info = json.load(r)  # what the page's Weights section must show
        restricted = list(iter_documents(corpus_dir, tiers=("restricted",)))
        mine = [d for d in restricted if d["owner"] == OWNER]
        theirs = [d for d in restricted if d["owner"] == OTHER]
        self.doc, self.spare = mine[0], mine[1]  # the flow removes doc; spare is left for other tests
        self.others_doc = theirs[0]


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_model, corpus_dir):
    _need_browser()  # before minutes of building, when there is no browser to test with
    s = Site(tiny_model, corpus_dir, tmp_path_factory.mktemp("owners-page"))
    yield s
    s.http.stop()


@pytest.fixture(scope="module")
def driver():
    chromium, chromedriver = _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--disable-gpu", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield d
    d.quit()


class Page:
    """The owners' page in the browser, by its stable element ids."""

    def __init__(self, driver, site: Site, shots: Path):
        self.d, self.site, self.shots = driver, site, shots
        driver.set_window_size(1280, 1000)
        driver.get(site.url)
        self.wait_for(lambda d: "ready" in d.find_element("tag name", "body").get_attribute("class"))

    def by_id(self, element_id: str):
        return self.d.find_element("id", element_id)

    def text(self, element_id: str) -> str:
        return self.by_id(element_id).text

    def wait_for(self, condition, message: str = ""):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.d, WAIT_S).until(condition, message)

    def wait_text(self, element_id: str, needle: str) -> str:
        """Waits until the element's visible text contains `needle`; returns the text."""
        self.wait_for(lambda d: needle in d.find_element("id", element_id).text,
                      f"{needle!r} never appeared in #{element_id}")
        return self.text(element_id)

    def type(self, element_id: str, text: str) -> None:
        box = self.by_id(element_id)
        box.clear()
        # send_keys types character by character: set long texts directly, as a paste would
        if len(text) > 80:
            self.d.execute_script("arguments[0].value = arguments[1];", box, text)
        else:
            box.send_keys(text)

    def trace(self, text: str) -> str:
        self.d.execute_script("document.getElementById('trace-results').replaceChildren();")
        self.type("trace-text", text)
        self.by_id("trace-submit").click()
        return self.wait_text("trace-results", "Checked")

    def sign_in(self, token: str) -> str:
        self.d.execute_script("document.getElementById('who').replaceChildren();")
        self.type("token", token)
        self.by_id("sign-in").click()
        self.wait_for(lambda d: d.find_element("id", "who").text.strip(), "no answer to the sign-in")
        return self.text("who")

    def click_and_wait(self, button: str, region: str, needle: str) -> str:
        self.d.execute_script(f"document.getElementById('{region}').replaceChildren();")
        self.by_id(button).click()
        return self.wait_text(region, needle)

    def shot(self, name: str, element_id: str | None = None) -> Path:
        """A screenshot of the window, scrolled to show `element_id` first."""
        if element_id is not None:
            self.d.execute_script("arguments[0].scrollIntoView({block: 'start'});", self.by_id(element_id))
        path = self.shots / f"{name}.png"
        self.d.save_screenshot(str(path))
        print(f"screenshot: {path}")
        return path

    def no_horizontal_scroll(self) -> bool:
        return self.d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth;")


@pytest.fixture
def page(driver, site, tmp_path) -> Page:
    return Page(driver, site, tmp_path)


def _listed_docs(page: Page) -> list[str]:
    return [e.text for e in page.d.find_elements("css selector", "#span-list li.doc code")]


def test_an_owner_finds_removes_and_checks_their_document(page, site):
    doc = site.doc
    # 1. the owner's text is found, with the document, its source, license and owner
    found = page.trace(doc["text"])
    assert "tokens" in found and page.d.find_elements("css selector", "#trace-highlight mark"), found
    assert doc["doc_id"] in _listed_docs(page)
    listed = next(e.text for e in page.d.find_elements("css selector", "#span-list li.doc")
                  if e.text.startswith(doc["doc_id"]))
    assert doc["source"] in listed and OWNER in listed and (doc["license"] or "none given") in listed
    # and the weights: the served model's training record says the (restricted) text was never trained on
    assert "the text is not in the training data" in page.text("audit-statement")
    page.shot("01-trace", "trace-results")

    # 2. signing in with the owner token says who it is; the token is nowhere to be seen
    assert f"owner {OWNER}" in page.sign_in(site.token)
    assert page.by_id("token").get_attribute("value") == "" and site.token not in page.d.current_url
    assert page.by_id("sign-out").is_displayed()
    page.shot("02-signed-in", "sign-in-heading")

    # 3. select the document; the dry run shows it and removes nothing
    box = page.by_id(f"doc-{doc['doc_id']}")
    assert "yours" in page.d.find_element("css selector", f"label[for='doc-{doc['doc_id']}']").text
    box.click()
    assert box.is_selected()
    preview = page.click_and_wait("preview", "optout-results", "would remove")
    assert doc["doc_id"] in page.text("preview-docs") and "1 document" in preview
    page.shot("03-preview", "remove-heading")
    assert doc["doc_id"] in page.trace(doc["text"])  # still there after the preview
    assert page.by_id(f"doc-{doc['doc_id']}").is_selected()  # a new check keeps the selection

    # 4. confirm: a receipt id and the time it was logged, with a note to keep it
    page.click_and_wait("confirm", "optout-results", "Keep this receipt id")
    receipt = page.text("receipt-id")
    assert receipt and page.text("receipt-time") and doc["doc_id"] in page.text("removed-docs")
    assert page.d.switch_to.active_element.get_attribute("id") == "receipt"  # focus moved to it
    page.shot("04-receipt", "receipt")

    # 5. the receipt's status: removed, logged, tombstoned; and what the weights were trained on
    page.type("status-receipt", receipt)
    status = page.click_and_wait("status-submit", "status-results", "Weights")
    fields = page.text("status-fields")
    assert "Removed\nyes" in fields and "Tombstoned (excluded from retrieval in every store)\nyes" in fields
    assert "Logged (in the opt-out log, checksum verified)\nyes" in fields and receipt in fields
    assert "infgram" in page.text("store-proofs") and "token" in page.text("store-proofs")
    trained = ", ".join(site.info["trained_tiers"])
    assert trained and not site.info["trained_on_restricted"]
    weights = page.text("weights-info")
    assert f"Trained on the tiers\n{trained}" in weights and "Trained on restricted text\nno" in weights, status
    # the served model's training record, checked for the removed document
    assert page.text("weights-statement").startswith("not in the training record of the served model"), status
    assert "Training record of the model\nyes: checked exactly" in page.text("receipt-weights")
    page.shot("05-status", "status-results")

    # 6. the same text again: that document is no longer a source of any part of it
    again = page.trace(doc["text"])
    assert doc["doc_id"] not in _listed_docs(page), again
    page.shot("06-trace-after-removal", "trace-results")


def test_a_wrong_token_and_another_owners_document_are_refused(page, site):
    said = page.sign_in("silo-owner-nope-" + "x" * 40)
    assert "not accepted" in said and "not signed in" in said.lower()
    assert page.d.find_element("css selector", "#who [role=alert]")
    page.shot("01-wrong-token", "sign-in-heading")

    assert f"owner {OWNER}" in page.sign_in(site.token)
    theirs = site.others_doc["doc_id"]
    page.type("doc-ids", theirs)  # typed by hand: another owner's document
    refused = page.click_and_wait("confirm", "optout-results", "Not allowed")
    assert theirs in refused and page.d.find_element("css selector", "#optout-results [data-status='403']")
    assert not page.d.find_elements("id", "receipt")
    page.shot("02-not-yours", "remove-heading")

    # signed out, a removal is not even sent
    page.by_id("sign-out").click()
    assert "Not signed in" in page.wait_text("who", "Signed out")
    assert "Sign in" in page.click_and_wait("preview", "optout-results", "Sign in")


def test_the_trace_step_with_the_keyboard_alone(page, site):
    from selenium.webdriver.common.keys import Keys

    page.by_id("trace-text").click()  # focus the textarea (a user tabbing in lands here too)
    assert page.d.switch_to.active_element.get_attribute("id") == "trace-text"
    sentence = site.spare["text"].split(". ")[0] + "."
    page.d.switch_to.active_element.send_keys(sentence)
    page.d.switch_to.active_element.send_keys(Keys.TAB)
    assert page.d.switch_to.active_element.get_attribute("id") == "trace-submit"  # natural tab order
    page.d.switch_to.active_element.send_keys(Keys.ENTER)
    found = page.wait_text("trace-results", "Checked")
    assert page.d.find_elements("css selector", "#trace-highlight mark") and _listed_docs(page), found
    page.shot("01-keyboard-trace", "trace-results")

    # Enter in a one-field form submits it: the receipt lookup, without a sign-in, says to sign in
    page.by_id("status-receipt").send_keys("no-such-receipt", Keys.ENTER)
    assert page.wait_text("status-results", "Sign in first")


def test_text_that_is_nowhere_and_markup_that_stays_text(page, site):
    nowhere = page.trace("Zebras quietly juggle violet umbrellas above Reykjavik harbour at noon.")
    assert "No part of this text was found verbatim" in nowhere

    hostile = '<img src=x onerror="document.title=\'owned\'"><b>bold</b> ' + site.spare["text"]
    page.trace(hostile)
    assert page.d.find_elements("css selector", "#trace-highlight mark")
    assert not page.d.find_elements("css selector", "#trace-results img, #trace-results b")
    assert page.text("trace-highlight").startswith("<img src=x") and page.d.title != "owned"


def test_no_horizontal_scroll_on_a_phone(page, site):
    page.d.set_window_size(375, 812)
    # the widest content the page shows: long found spans, document lists, an unbroken id
    page.trace(site.spare["text"] + " " + "x" * 400)
    page.sign_in(site.token)
    page.type("doc-ids", "doc-" + "9" * 200)
    page.click_and_wait("preview", "optout-results", "Not found")
    assert page.d.execute_script("return window.innerWidth;") <= 400
    assert page.no_horizontal_scroll(), page.d.execute_script(
        "return [document.documentElement.scrollWidth, window.innerWidth];")
    page.shot("01-phone", "trace-results")
