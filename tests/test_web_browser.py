"""
The web page in a real browser: Debian's headless Chromium driven by
Selenium through Debian's chromedriver (no browser is ever downloaded).
Mail goes in over SMTP with smtplib and must show on the open page with no
reload (the live stream); the HTML preview must not run the message's
script; unblocking from the screening panel must let SMTP in again.

Chromium, chromedriver and selenium are required under
MAILSCREEN_REQUIRE_CLIENTS=1 (CI): missing, these tests fail there.
"""

from __future__ import annotations

import os
import smtplib
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from typing import Any

import pytest

from twisted.internet.task import Clock

from conftest import require_tool
from relay_sink import Sink, wait_for
from webclient import call

pytestmark = pytest.mark.tool("chromium", "chromedriver")

try:
    from selenium import webdriver
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - what CI must never see
    webdriver = None  # type: ignore[assignment]

#: How long the page may take to show what the server already has.
PATIENCE = 15.0

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    if webdriver is None:
        why = "selenium is not installed (pip install '.[test]')"
        if os.environ.get("MAILSCREEN_REQUIRE_CLIENTS"):
            pytest.fail(f"{why}, and MAILSCREEN_REQUIRE_CLIENTS=1 requires it", pytrace=False)
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = require_tool("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(require_tool("chromedriver")), options=options)
    driver.set_page_load_timeout(PATIENCE)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def web(start_server):
    return start_server(kinds=("smtp", "web"))


def until(driver: WebDriver, what: Callable[[WebDriver], Any], message: str) -> Any:
    """What C{what} returns once it is truthy (the page updates on its own; this waits for it)."""
    def attempt(d: WebDriver) -> Any:
        try:
            return what(d)
        except (NoSuchElementException, StaleElementReferenceException):
            # The list is redrawn as the live stream reports: look again.
            return None
    return WebDriverWait(driver, PATIENCE).until(attempt, message)


def open_page(driver: WebDriver, server: Any, fragment: str = "") -> None:
    """Load the page and wait until its live stream is connected and its first load shown."""
    driver.get(f"http://127.0.0.1:{server.port('web')}/{fragment}")
    until(driver, lambda d: d.find_element(By.ID, "live").get_attribute("data-state") == "live",
          "the live stream did not connect")
    # A mark a reload would wipe: what shows later came without one. And a
    # record of anything the page itself does that its own policy refuses.
    driver.execute_script("""
        window.stillTheSamePage = true;
        window.violations = [];
        document.addEventListener("securitypolicyviolation",
            (e) => window.violations.push(`${e.violatedDirective} ${e.blockedURI}`));""")


def page_kept_its_policy(driver: WebDriver) -> None:
    assert driver.execute_script("return window.violations;") == []


def same_page(driver: WebDriver) -> bool:
    return driver.execute_script("return window.stillTheSamePage === true;")


def send(server: Any, message: EmailMessage) -> None:
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10) as client:
        client.send_message(message)


def mail(subject: str, body: str = "Hello from the browser test.\n", sender: str = "carol@example.test",
         html: str | None = None) -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"Carol <{sender}>"
    message["To"] = "dave@example.test"
    message["Subject"] = subject
    message.set_content(body)
    if html is not None:
        message.add_alternative(html, subtype="html")
    return message


def row(driver: WebDriver, subject: str) -> WebElement | None:
    for item in driver.find_elements(By.CSS_SELECTOR, "#message-list li.message"):
        if item.find_element(By.CLASS_NAME, "subject").text == subject:
            return item
    return None


def click(driver: WebDriver, selector: str) -> None:
    """Click what C{selector} finds, found again if a redraw replaced it meanwhile."""
    def clicked(d: WebDriver) -> bool:
        d.find_element(By.CSS_SELECTOR, selector).click()
        return True
    until(driver, clicked, f"could not click {selector}")


def listed(driver: WebDriver, subject: str) -> dict[str, Any] | None:
    """What the list shows of a message, read in one step (the list may be redrawn at any time)."""
    return driver.execute_script("""
        for (const item of document.querySelectorAll("#message-list li.message")) {
            if (item.querySelector(".subject").textContent !== arguments[0]) continue;
            return {classes: [...item.classList], from: item.querySelector(".from").textContent,
                    elements: [...item.querySelectorAll("*")].map((e) => e.tagName.toLowerCase())};
        }
        return null;""", subject)


def open_message(driver: WebDriver, subject: str) -> None:
    """Click the message's row (found again if the list was redrawn meanwhile) until it is open."""
    def opened(d: WebDriver) -> bool:
        if d.find_element(By.ID, "mv-subject").text == subject:
            return True
        item = row(d, subject)
        if item is not None:
            item.click()
        return False
    until(driver, opened, f"the message {subject!r} did not open")


def test_a_message_sent_over_smtp_appears_without_a_reload_and_opens(browser, web):
    open_page(browser, web)
    until(browser, lambda d: d.find_element(By.ID, "list-status").text.startswith("0 messages"),
          "the empty list did not load")
    message = mail("Quarterly report", "Plain text body line.\n")
    message.add_attachment(b"a,b\n1,2\n", maintype="text", subtype="csv", filename="report.csv")
    send(web, message)

    shown = until(browser, lambda d: listed(d, "Quarterly report"), "the new message did not show")
    assert same_page(browser), "the page was reloaded"
    assert "unread" in shown["classes"]
    assert shown["from"] == "Carol <carol@example.test>"

    open_message(browser, "Quarterly report")
    click(browser, "[data-tab=text]")
    assert "Plain text body line." in browser.find_element(By.ID, "tab-text").text
    click(browser, "[data-tab=headers]")
    until(browser, lambda d: "Quarterly report" in d.find_element(By.ID, "mv-headers").text,
          "the headers did not load")
    click(browser, "[data-tab=raw]")
    until(browser, lambda d: "Subject: Quarterly report" in d.find_element(By.ID, "tab-raw").text,
          "the raw source did not load")

    link = browser.find_element(By.CSS_SELECTOR, "#mv-attachments a")
    assert link.text == "report.csv" and link.get_attribute("download") == "report.csv"
    href = link.get_attribute("href")
    part = call(web.port("web"), "GET", href.split(str(web.port("web")), 1)[1])
    assert (part.status, part.body.replace(b"\r\n", b"\n")) == (200, b"a,b\n1,2\n")

    # Opening it marked it read, and the list says so without a reload.
    until(browser, lambda d: "unread" not in listed(d, "Quarterly report")["classes"],
          "the list did not show the message as read")

    click(browser, "#mv-delete")
    until(browser, lambda d: listed(d, "Quarterly report") is None, "the deleted message stayed listed")
    assert browser.find_element(By.ID, "message-view").get_attribute("hidden") is not None
    assert call(web.port("web"), "GET", "/api/v1/messages").json["total"] == 0
    assert same_page(browser)
    page_kept_its_policy(browser)


def test_search_and_purge(browser, web):
    open_page(browser, web)
    send(web, mail("Invoice 41", sender="billing@example.test"))
    send(web, mail("Lunch on Friday", sender="friend@example.test"))
    until(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#message-list li")) == 2,
          "the two messages did not show")
    search = browser.find_element(By.ID, "search")
    search.send_keys("from:billing@example.test")
    click(browser, "#search-form button[type=submit]")
    until(browser, lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, "#message-list .subject")]
          == ["Invoice 41"], "the search did not narrow the list")
    click(browser, "#search-clear")
    until(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#message-list li")) == 2,
          "clearing the search did not bring both back")

    click(browser, "#purge")
    browser.switch_to.alert.accept()
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#message-list li") == [],
          "purge left messages listed")
    assert call(web.port("web"), "GET", "/api/v1/messages").json["total"] == 0


HOSTILE = """<html><head><title>inner title</title></head>
<body onload="parent.postMessage('body-onload ran', '*')">
<p id="marker">Preview marker</p>
<script>
  document.title = "pwned by script";
  window.pwned = true;
  document.getElementById("marker").textContent = "script ran";
  try { parent.postMessage("script ran", "*"); } catch (e) {}
  try { top.document.title = "pwned the page"; } catch (e) {}
  try { parent.stillTheSamePage = "overwritten"; } catch (e) {}
</script>
<img id="broken" src="data:image/png;base64,AAAA"
     onerror="document.title = 'pwned by onerror'; parent.postMessage('onerror ran', '*')">
</body></html>
"""


def test_the_html_preview_cannot_run_script(browser, web):
    open_page(browser, web)
    # Anything the message's code could say to the page would arrive here.
    browser.execute_script(
        "window.heard = []; window.addEventListener('message', (e) => window.heard.push(String(e.data)));")
    send(web, mail("Hostile HTML", html=HOSTILE))
    open_message(browser, "Hostile HTML")
    frame = until(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#tab-html iframe[src]"),
                  "the preview did not open")

    browser.switch_to.frame(frame)
    try:
        until(browser, lambda d: d.find_element(By.ID, "marker").text, "the preview did not render")
        # The broken image has failed to load by now: its onerror had its chance.
        until(browser, lambda d: d.execute_script(
            "const img = document.getElementById('broken'); return img.complete;"), "the image did not settle")
        assert browser.find_element(By.ID, "marker").text == "Preview marker"
        assert browser.execute_script("return document.title;") == "inner title"
        assert browser.execute_script("return typeof window.pwned;") == "undefined"
    finally:
        browser.switch_to.default_content()

    assert browser.title == "mailscreen"
    assert browser.execute_script("return window.heard;") == []
    assert same_page(browser)
    page_kept_its_policy(browser)
    # Not only does this server's preview policy forbid scripts: the frame
    # itself is an empty sandbox with an origin of its own, which the page
    # cannot reach into and which cannot reach the page.
    assert browser.execute_script("return arguments[0].contentDocument === null;", frame)
    assert frame.get_attribute("sandbox") == ""


def test_message_texts_show_as_text_never_as_markup(browser, web):
    open_page(browser, web)
    subject = '<img src="x" id="injected"><b>bold</b>'
    message = mail(subject, sender="mallory@example.test")
    message.replace_header("From", '"<i>Mallory</i>" <mallory@example.test>')
    message["X-Note"] = "<em>header markup</em>"
    send(web, message)
    shown = until(browser, lambda d: listed(d, subject), "the message did not show")
    assert set(shown["elements"]) == {"span"}  # the row's own fields, no element from the data
    assert shown["from"] == "<i>Mallory</i> <mallory@example.test>"
    open_message(browser, subject)
    click(browser, "[data-tab=headers]")
    until(browser, lambda d: "<em>header markup</em>" in d.find_element(By.ID, "mv-headers").text,
          "the headers did not load")
    assert browser.find_elements(By.CSS_SELECTOR, "#message-view img, #message-view em, #message-view b") == []
    assert browser.find_elements(By.ID, "injected") == []


def smtp_accepts(server: Any) -> bool:
    try:
        with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10) as client:
            return client.noop()[0] == 250
    except (smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected):
        return False


def test_unblocking_from_the_screening_panel_lets_smtp_in_again(browser, start_server):
    # A test host trusts loopback by default; this one does not, so a block of 127.0.0.1 bites.
    web = start_server(kinds=("smtp", "web"), screening__whitelist=[])
    port = web.port("web")
    blocked = call(port, "POST", "/api/v1/screening/blocks",
                   {"address": "127.0.0.1", "minutes": 60, "reason": "browser test"})
    assert blocked.status == 201, blocked.body
    assert not smtp_accepts(web)

    open_page(browser, web, "#screening")
    cells = until(browser, lambda d: d.execute_script(
        """const row = document.querySelector('tr[data-address="127.0.0.1"]');
           return row && [...row.cells].map((cell) => cell.textContent);"""), "the block did not show")
    address, rule, _count, _offence, left, reason, button = cells
    assert (address, rule, button) == ("127.0.0.1", "manual", "Unblock")
    assert left.startswith(("59m", "1h")) and "browser test" in reason
    # The chart: three series of a point per minute.
    points = until(browser, lambda d: d.execute_script(
        """return [...document.querySelectorAll("#chart svg polyline")].map(
               (line) => line.getAttribute("points").split(" ").length);"""), "the chart was not drawn")
    assert points == [60, 60, 60]

    click(browser, 'tr[data-address="127.0.0.1"] button.unblock')
    until(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, 'tr[data-address="127.0.0.1"]'),
          "the unblocked address stayed listed")
    assert smtp_accepts(web)
    assert call(port, "GET", "/api/v1/screening/blocks").json["blocks"] == []

    # A block made elsewhere shows up on the open page by itself (the live stream).
    call(port, "POST", "/api/v1/screening/blocks", {"address": "198.51.100.0/24", "reason": "net"})
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-address="198.51.100.0/24"]'),
          "a new block did not show without a reload")
    assert same_page(browser)
    # A network's "/" goes in the path as %2F.
    click(browser, 'tr[data-address="198.51.100.0/24"] button.unblock')
    until(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, 'tr[data-address="198.51.100.0/24"]'),
          "the unblocked network stayed listed")
    assert call(port, "GET", "/api/v1/screening/blocks").json["blocks"] == []
    page_kept_its_policy(browser)


def test_site_mode_an_account_sees_its_own_mailbox_and_no_screening(browser, start_server, accounts):
    """Opened with an account's Basic credentials (in the URL, as a bookmark would have them)."""
    site = start_server(site=True, kinds=("smtp", "web"), web__admins=["alice@example.test"])
    for rcpt in ("alice@example.test", "bob@example.test"):
        message = mail(f"For {rcpt}", html=f"<p id='marker'>Only {rcpt}</p>")
        message.replace_header("To", rcpt)
        send(site, message)
    browser.get(f"http://bob%40example.test:bob-secret@127.0.0.1:{site.port('web')}/")
    until(browser, lambda d: d.find_element(By.ID, "list-status").text == "1 message, 1 unread",
          "bob's mailbox did not load")
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#message-list .subject")] \
        == ["For bob@example.test"]
    open_message(browser, "For bob@example.test")
    browser.switch_to.frame(browser.find_element(By.CSS_SELECTOR, "#tab-html iframe[src]"))
    try:
        until(browser, lambda d: d.find_element(By.ID, "marker").text == "Only bob@example.test",
              "the preview did not load with the account's credentials")
    finally:
        browser.switch_to.default_content()
    click(browser, "[data-panel=screening]")
    until(browser, lambda d: d.find_element(By.ID, "blocks-status").text == "Screening is for administrators.",
          "the screening panel did not say it is for administrators")
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None


def busy(stage: str, arg: str, sink: Sink) -> str | None:
    return "451 4.3.0 busy" if stage == "rcpt" else None


def queue_row(driver: WebDriver, queue_id: str) -> list[str] | None:
    return driver.execute_script(
        """const row = document.querySelector(`#queue tr[data-id="${arguments[0]}"]`);
           return row && [...row.cells].map((cell) => cell.textContent);""", queue_id)


def test_the_queue_panel_holds_releases_and_deletes(browser, start_server):
    sink = Sink(policy=busy).start()
    try:
        # A test host relaying to a smarthost that answers 451: the message stays queued.
        web = start_server(kinds=("smtp", "web"), clock=Clock(), domains=["example.test"],
                           relay__enabled=True, relay__smarthost=f"tcp:host=127.0.0.1:port={sink.port}",
                           relay__starttls="none", relay__retry_minutes=10)
        port = web.port("web")

        def listing() -> list[dict[str, Any]]:
            return call(port, "GET", "/api/v1/queue").json["messages"]

        open_page(browser, web, "#queue")
        until(browser, lambda d: d.find_element(By.ID, "queue-status").text == "0 messages queued.",
              "the empty queue did not show")
        outbound = mail("Outbound")
        outbound.replace_header("To", "erin@remote.example")
        send(web, outbound)
        [entry] = wait_for(lambda: [e for e in listing() if e["attempts"] == 1], what="a first attempt")
        queue_id = entry["id"]

        cells = until(browser, lambda d: queue_row(d, queue_id), "the queued message did not show")
        assert cells[1] == "carol@example.test"
        assert cells[2] == "erin@remote.example — pending (451 4.3.0 busy)"
        click(browser, f'#queue tr[data-id="{queue_id}"] button:not(.danger)')  # Hold
        until(browser, lambda d: queue_row(d, queue_id)[6] == "held", "the message did not show as held")
        assert listing()[0]["held"] is True
        click(browser, f'#queue tr[data-id="{queue_id}"] button:not(.danger)')  # Release
        until(browser, lambda d: queue_row(d, queue_id)[6] != "held", "the message stayed held")
        assert listing()[0]["held"] is False

        click(browser, f'#queue tr[data-id="{queue_id}"] button.danger')
        browser.switch_to.alert.accept()
        until(browser, lambda d: queue_row(d, queue_id) is None, "the deleted message stayed listed")
        assert listing() == []
        page_kept_its_policy(browser)
    finally:
        sink.stop()
