"""The /admin page in headless Chromium (Debian chromium + chromium-driver, selenium).

Transactions are created through the API; the browser then logs in, lists, filters,
opens a detail page, force-stops a running transaction and makes a waiting one run now.
Set ADMIN_SCREENSHOTS=docs to refresh the screenshots the README shows.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import require_service
from tests.support import OK, ONGOING, Api, CoordinatorProcess, Participant, saga_body, wait_for

TOKEN = "admin-t0ken-xyz"
SECRET = "Bearer branch-secret-value"
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        require_service("selenium", str(exc))
    binary = next((b for b in CHROMIUM if os.path.exists(b)), shutil.which("chromium"))
    driver_path = DRIVER if os.path.exists(DRIVER) else shutil.which("chromedriver")
    if not binary or not driver_path:
        require_service("chromium", "install the Debian packages chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(binary)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(driver_path)),
                              options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
async def admin_coordinator(redis_url: str, prefix: str) -> AsyncIterator[CoordinatorProcess]:
    proc = await CoordinatorProcess(redis_url, prefix, COORDINATOR_SERVER_API_TOKEN=TOKEN).start()
    yield proc
    await proc.aclose()


async def in_thread(func: Any, *args: Any) -> Any:
    """Selenium blocks; the participant in this event loop must keep answering."""
    return await asyncio.to_thread(func, *args)


def shot(driver: Any, name: str, tmp: Path) -> None:
    target = os.environ.get("ADMIN_SCREENSHOTS")
    folder = Path(target) if target else tmp
    folder.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(folder / name))


async def test_admin_in_a_real_browser(
    browser: Any, admin_coordinator: CoordinatorProcess, participant: Participant,
    session: aiohttp.ClientSession, prefix: str, tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    base = admin_coordinator.base
    api = Api(session, admin_coordinator.api, TOKEN)
    done, running, waiting = f"{prefix}-done", f"{prefix}-running", f"{prefix}-waiting"
    # A finished saga (with a secret branch header), one that keeps answering ONGOING
    # (running), one that waits a long retry interval after ONGOING (waiting).
    body = saga_body(done, participant, 2, wait_result=True,
                     branch_headers={"Authorization": SECRET})
    assert (await api.post("submit", body))[0] == 200
    participant.plan_for(running, "a1", ONGOING)
    assert (await api.post("submit", saga_body(running, participant, 1)))[0] == 200
    participant.plan_for(waiting, "a1", ONGOING)
    assert (await api.post("submit", saga_body(waiting, participant, 1,
                                               retry_interval=3600)))[0] == 200
    await wait_for(lambda: participant.calls_to("a1", waiting), 5, 0.05, "the first call")

    d = browser
    wait = WebDriverWait(d, 10)

    def open_page(path: str) -> None:
        d.get(base + path)

    # Log-in is required: the list redirects to the form; a wrong token is refused.
    await in_thread(open_page, "/admin/transactions")
    assert "/admin/login" in d.current_url
    d.find_element(By.ID, "token").send_keys("wrong")
    d.find_element(By.ID, "login-button").click()
    error = wait.until(ec.presence_of_element_located((By.ID, "error")))
    assert "not the token" in error.text
    d.find_element(By.ID, "token").send_keys(TOKEN)
    await in_thread(d.find_element(By.ID, "login-button").click)
    wait.until(ec.presence_of_element_located((By.ID, "transactions")))
    assert d.current_url.endswith("/admin/transactions")
    session_cookie = d.get_cookie("coordinator_admin")
    assert session_cookie is not None
    assert session_cookie["httpOnly"]
    assert session_cookie["sameSite"] == "Strict"
    assert TOKEN not in session_cookie["value"]

    # The list shows all three; the status filter and the gid prefix filter work.
    rows = {r.get_attribute("data-gid") for r in d.find_elements(By.CSS_SELECTOR, ".trans-row")}
    assert {done, running, waiting} <= rows
    Select(d.find_element(By.ID, "f-status")).select_by_value("succeed")
    d.find_element(By.ID, "f-gid").send_keys(prefix)
    await in_thread(d.find_element(By.ID, "apply").click)
    wait.until(ec.url_contains("status=succeed"))
    rows = {r.get_attribute("data-gid") for r in d.find_elements(By.CSS_SELECTOR, ".trans-row")}
    assert rows == {done}
    await in_thread(open_page, f"/admin/transactions?gid={prefix}-w")
    rows = {r.get_attribute("data-gid") for r in d.find_elements(By.CSS_SELECTOR, ".trans-row")}
    assert rows == {waiting}
    await in_thread(open_page, f"/admin/transactions?gid={prefix}")
    shot(d, "admin-transactions.png", tmp_path)

    # The detail page: every branch with its URL and payload; header values hidden.
    d.find_element(By.LINK_TEXT, done).click()
    wait.until(ec.presence_of_element_located((By.ID, "branches")))
    assert d.current_url.endswith(f"/admin/transactions/{done}")
    branch_rows = d.find_elements(By.CSS_SELECTOR, ".branch-row")
    assert len(branch_rows) == 4  # compensate + action per step
    text = d.find_element(By.ID, "branches").text
    assert participant.url("a2") in text
    assert '{"step":2}' in text
    assert d.find_element(By.ID, "status").text == "succeed"
    assert "finished: succeed" in d.find_element(By.ID, "timeline").text
    assert "branch-secret-value" not in d.page_source
    assert TOKEN not in d.page_source
    assert "Authorization" in d.page_source  # the header's name is shown, not its value
    shot(d, "admin-transaction.png", tmp_path)

    # Force stop ends the running one (after a confirmation).
    await in_thread(open_page, f"/admin/transactions/{running}")
    assert d.find_element(By.ID, "status").text in ("submitted",)
    d.find_element(By.ID, "force-stop").click()
    wait.until(ec.alert_is_present())
    d.switch_to.alert.accept()
    wait.until(ec.presence_of_element_located((By.ID, "message")))
    assert d.find_element(By.ID, "status").text == "failed"
    assert d.find_element(By.ID, "rollback-reason").text == "force stopped"
    assert await api.status(running) == "failed"

    # Retry now: the waiting one (next try in an hour) runs at once and succeeds.
    participant.plan_for(waiting, "a1", OK)
    await in_thread(open_page, f"/admin/transactions/{waiting}")
    calls_before = len(participant.calls_to("a1", waiting))
    d.find_element(By.ID, "retry-now").click()
    wait.until(ec.alert_is_present())
    d.switch_to.alert.dismiss()  # cancelling the confirmation does nothing
    await asyncio.sleep(0.5)
    assert len(participant.calls_to("a1", waiting)) == calls_before
    d.find_element(By.ID, "retry-now").click()
    wait.until(ec.alert_is_present())
    await in_thread(d.switch_to.alert.accept)
    await api.wait_status(waiting, "succeed", timeout=5)
    assert len(participant.calls_to("a1", waiting)) == calls_before + 1

    # Topics: add a subscriber and remove it again.
    await in_thread(open_page, "/admin/topics")
    d.find_element(By.ID, "s-topic").send_keys(f"{prefix}-topic")
    d.find_element(By.ID, "s-url").send_keys(participant.url("sub"))
    await in_thread(d.find_element(By.ID, "add-subscriber").click)
    subs = wait.until(lambda drv: drv.find_elements(
        By.CSS_SELECTOR, f'.subscriber[data-topic="{prefix}-topic"]'))
    assert len(subs) == 1
    subs[0].find_element(By.TAG_NAME, "button").click()
    wait.until(ec.alert_is_present())
    await in_thread(d.switch_to.alert.accept)
    wait.until(lambda drv: not drv.find_elements(
        By.CSS_SELECTOR, f'.subscriber[data-topic="{prefix}-topic"]'))
    # Delete a whole topic.
    status, reply = await api.get("subscribe", topic=f"{prefix}-gone", url=participant.url("s"))
    assert status == 200, reply
    await in_thread(open_page, "/admin/topics")
    Select(d.find_element(By.ID, "delete-topic")).select_by_value(f"{prefix}-gone")
    d.find_element(By.ID, "delete-button").click()
    wait.until(ec.alert_is_present())
    await in_thread(d.switch_to.alert.accept)
    wait.until(lambda drv: not drv.find_elements(
        By.CSS_SELECTOR, f'.subscriber[data-topic="{prefix}-gone"]'))
    assert f"{prefix}-gone" not in await store_topics(api)

    # The dashboard reads the metrics: the finished transactions are counted.
    await in_thread(open_page, "/admin/dashboard")
    assert int(d.find_element(By.ID, "transactions_ok").text) >= 2
    assert int(d.find_element(By.ID, "transactions_fail").text) == 0  # force-stop: no round


async def store_topics(api: Api) -> list[str]:
    _, body = await api.get("scanKV", cat="topics")
    return [item["k"] for item in body["kv"]]


async def test_admin_token_rules_without_a_browser(
    admin_coordinator: CoordinatorProcess, session: aiohttp.ClientSession, prefix: str,
) -> None:
    base = admin_coordinator.base
    async with aiohttp.ClientSession() as anon:
        async with anon.get(f"{base}/admin/transactions", allow_redirects=False) as r:
            assert r.status == 303
            assert r.headers["Location"].startswith("/admin/login")
        async with anon.post(f"{base}/admin/transactions/x/force-stop") as r:
            assert r.status == 401
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    api = Api(session, admin_coordinator.api, TOKEN)
    for i in range(3):
        body = {"gid": f"{prefix}-p{i}", "trans_type": "saga", "wait_result": True,
                "steps": [{"action": "", "compensate": ""}], "payloads": [""]}
        assert (await api.post("submit", body))[0] == 200

    async def listed(query: str) -> tuple[list[str], str]:
        async with session.get(f"{base}/admin/transactions?{query}", headers=bearer) as r:
            assert r.status == 200
            html = await r.text()
        gids = re.findall(r'class="trans-row" data-gid="([^"]+)"', html)
        link = re.search(r'href="([^"]+)" id="next-page"', html)
        return gids, link.group(1).replace("&amp;", "&") if link else ""

    # Paging, newest first, one at a time.
    gids, link = await listed(f"gid={prefix}-p&limit=1")
    seen = list(gids)
    while link:
        gids, link = await listed(link.split("?", 1)[1])
        seen += gids
    assert seen == [f"{prefix}-p2", f"{prefix}-p1", f"{prefix}-p0"]
    # The time range: all were created before now + 1 min, none after it.
    later = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(time.time() + 60))
    assert len((await listed(f"gid={prefix}-p&to={later}"))[0]) == 3
    assert (await listed(f"gid={prefix}-p&from={later}"))[0] == []
    async with session.get(f"{base}/admin/transactions", headers=bearer) as r:
        assert r.status == 200
        assert TOKEN not in await r.text()
    # A logged-in browser's form without the CSRF value (another site's form) is refused.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        async with browser.get(f"{base}/admin/login") as r:
            assert r.status == 200
        csrf = next(c.value for c in browser.cookie_jar if c.key == "coordinator_csrf")
        async with browser.post(f"{base}/admin/login", allow_redirects=False,
                                data={"token": TOKEN, "csrf": csrf}) as r:
            assert r.status == 303
        async with browser.post(f"{base}/admin/transactions/x/force-stop",
                                data={"csrf": "forged"}) as r:
            assert r.status == 403
        async with browser.post(f"{base}/admin/transactions/x/force-stop",
                                headers={"Origin": "http://evil.example"},
                                data={"csrf": csrf}) as r:
            assert r.status == 403
        async with browser.post(f"{base}/admin/transactions/{prefix}-none/force-stop",
                                data={"csrf": csrf}) as r:
            assert r.status == 404  # past the checks: the gid does not exist
