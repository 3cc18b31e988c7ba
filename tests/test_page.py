"""The web page at /: browsers get it, API clients keep the JSON model card; it loads nothing from elsewhere; and,
in a real headless Chromium against a real uvicorn, a photo uploaded through it shows the label /classify gives."""
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.config import Settings
from server.main import create_app

from conftest import derive_bundle, serve, serve_bundle, stop_server

REPO = Path(__file__).resolve().parents[1]
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8"
ARTIFACTS = Path(os.environ.get("PROMPTKD_TEST_ARTIFACTS", REPO / "bench" / "results"))


@pytest.fixture(scope="module")
def client(bundle_dir):
    with TestClient(create_app(Settings(bundle=bundle_dir))) as client:
        yield client


def test_browsers_get_the_page_and_api_clients_the_model_card(client):
    page = client.get("/", headers={"Accept": BROWSER_ACCEPT})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="files"' in page.text and 'href="/docs"' in page.text
    assert page.headers["vary"] == "Accept" and client.get("/").headers["vary"] == "Accept"
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    for accept in (None, "*/*", "application/json", "text/html, application/json"):
        card = client.get("/", headers={"Accept": accept} if accept else {})
        assert card.headers["content-type"] == "application/json", accept
        assert card.json()["name"] == "tiny-test" and card.json()["limits"]["max_images_per_request"] == 16


def test_the_page_loads_only_its_own_assets(client):
    page = client.get("/", headers={"Accept": BROWSER_ACCEPT}).text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert assets and all(a.startswith("/") and not a.startswith("//") for a in assets), assets
    for asset in assets:
        if asset.startswith("/static/"):
            body = client.get(asset)
            assert body.status_code == 200 and not re.search(r"https?://|//[a-z]", body.text), asset
    assert "access-control-allow-origin" not in client.get("/static/app.js").headers
    assert client.get("/static/../main.py").status_code == 404


@pytest.fixture(scope="module")
def served(bundle_dir):
    proc, url = serve_bundle(bundle_dir)
    yield url
    stop_server(proc)


def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no Chromium here (Debian's chromium and chromium-driver; scripts/test.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_a_photo_uploaded_in_a_real_browser_shows_the_served_label(served, fmnist, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    photo = sorted((fmnist / "test").rglob("*.png"))[0]
    expected = httpx.post(f"{served}/classify", files={"file": photo.open("rb")}).json()
    expected_label = expected["results"][0]["predictions"][0]["label"]
    fake = tmp_path / "page.jpg"
    fake.write_text("<html><body>not a photo</body></html>")

    started = time.time()
    browser = _browser()
    try:
        browser.get(served)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: "labels" in b.find_element(By.ID, "model-card").text)
        browser.find_element(By.ID, "files").send_keys(f"{photo}\n{fake}")
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, ".card .prediction .label")))
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, ".card .error")))
        cards = browser.find_elements(By.CSS_SELECTOR, ".card")
        assert len(cards) == 2
        shown = cards[0].find_elements(By.CSS_SELECTOR, ".prediction .label")
        assert shown[0].text == expected_label and len(shown) == 5
        assert "Not classified" in cards[1].find_element(By.CSS_SELECTOR, ".error").text
        assert not cards[1].find_elements(By.CSS_SELECTOR, ".prediction")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "page.png"))
        console = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]
        assert not console, console
    finally:
        browser.quit()
    print(f"\nbrowser test: {time.time() - started:.1f} s in headless Chromium")


def test_the_model_picker_sends_each_photo_to_the_model_picked(bundle_dir, fmnist, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    derive_bundle(bundle_dir, tmp_path / "repo" / "alpha" / "1", "a:")
    derive_bundle(bundle_dir, tmp_path / "repo" / "beta" / "3", "b:", reverse=True)
    photo = sorted((fmnist / "test").rglob("*.png"))[0]
    browser = _browser()  # skips where there is no Chromium, before a server is started
    proc, url = serve(model_repository=str(tmp_path / "repo"))
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: "version 1" in b.find_element(By.ID, "model-name").text)
        picker = Select(browser.find_element(By.ID, "model"))
        assert [o.text for o in picker.options] == ["alpha (version 1)", "beta (version 3)"]
        for model, version in (("beta", "3"), ("alpha", "1")):
            expected = httpx.post(f"{url}/classify", params={"model": model}, files={"file": photo.open("rb")})
            picker.select_by_value(model)
            wait.until(lambda b, m=model: b.find_element(By.ID, "model-name").text.startswith(m))
            browser.find_element(By.ID, "files").send_keys(str(photo))
            wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, ".card .prediction .label")))
            shown = browser.find_element(By.CSS_SELECTOR, ".card .prediction .label").text
            assert shown == expected.json()["results"][0]["predictions"][0]["label"]
            assert browser.find_element(By.ID, "status").text.startswith(f"{model} version {version}")
            picker = Select(browser.find_element(By.ID, "model"))
    finally:
        browser.quit()
        stop_server(proc)


def test_the_card_shows_a_rollout_and_its_last_decision(bundle_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    shutil.copytree(bundle_dir, tmp_path / "repo" / "m" / "1")
    derive_bundle(bundle_dir, tmp_path / "repo" / "m" / "2", "b:")
    (tmp_path / "repo" / "m" / "model.yaml").write_text("rollout: {}\n")
    token = "page-rollout-token-0123456789abcdef"
    browser = _browser()
    proc, url = serve(model_repository=str(tmp_path / "repo"), admin_token=token)
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: "version 2 in shadow against version 1" in b.find_element(By.ID, "rollout").text)
        assert "waiting for" in browser.find_element(By.ID, "rollout").text
        refused = httpx.post(f"{url}/v2/repository/models/m/refuse", json={},
                             headers={"Authorization": f"Bearer {token}"})
        assert refused.status_code == 200, refused.text
        browser.refresh()
        wait.until(lambda b: "Last decision: refuse version 2 by operator" in b.find_element(By.ID, "rollout").text)
    finally:
        browser.quit()
        stop_server(proc)
