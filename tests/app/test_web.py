"""The web UI: request handling over real HTTP, and a headless-browser run (upload, swap, download)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from appleswap.app.provenance import read_image_provenance
from appleswap.app.web import WebApp, make_server, parse_multipart


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    defaults = dataclasses.replace(engine.config, watermark=True)
    app = WebApp(lambda config: engine.with_config(config), tmp_path_factory.mktemp("web"), defaults)
    httpd = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[str, bytes]:
    boundary = "----appleswaptest"
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        parts.append(head + data + b"\r\n")
    return f"multipart/form-data; boundary={boundary}", b"".join(parts) + f"--{boundary}--\r\n".encode()


def _post(url: str, fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[int, dict]:
    content_type, body = _multipart(fields, files)
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_parse_multipart():
    content_type, body = _multipart({"steps": "3"}, {"source": ("a b.jpg", b"\x00\x01binary")})
    fields, files = parse_multipart(content_type, body)
    assert fields == {"steps": "3"} and files == {"source": [("a b.jpg", b"\x00\x01binary")]}


def test_http_errors_are_messages(server, faces_dir):
    with urllib.request.urlopen(server + "/", timeout=30) as response:
        assert b"appleswap" in response.read()
    code, body = _post(server + "/api/swap", {}, {})
    assert code == 400 and "source" in body["error"]
    photo = (faces_dir / "biden2.jpg").read_bytes()
    code, body = _post(server + "/api/swap", {"steps": "many"}, {"source": ("s.jpg", photo), "target": ("t.jpg", photo)})
    assert code == 400 and "steps" in body["error"]
    code, body = _post(server + "/api/swap", {"steps": "1"},
                       {"source": ("s.jpg", photo), "target": ("t.jpg", b"garbage")})
    assert code == 400 and "t.jpg" in body["error"] and "/tmp" not in body["error"]  # no server paths shown
    code, body = _post(server + "/api/faces", {"face_selector_order": "left-right"},
                       {"target": ("two.jpg", (faces_dir / "two_people.jpg").read_bytes())})
    assert code == 200 and body["count"] == 2 and body["boxes"][0][0] < body["boxes"][1][0]


def _browser(download_dir: Path):
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian chromium + chromium-driver not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False})
    return webdriver.Chrome(service=Service(driver), options=options)


def _wait(predicate, timeout: float = 240.0):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError("timed out waiting in the browser")


@pytest.mark.browser
def test_browser_upload_swap_download(server, faces_dir, tmp_path):
    from selenium.webdriver.common.by import By

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    blank = tmp_path / "wall.png"
    Image.fromarray(np.full((200, 200, 3), 140, np.uint8)).save(blank)
    browser = _browser(downloads)
    try:
        browser.get(server + "/")
        find = browser.find_element
        find(By.ID, "source").send_keys(str(faces_dir / "obama1.jpg"))
        find(By.ID, "target").send_keys(str(blank))
        find(By.ID, "steps").clear()
        find(By.ID, "steps").send_keys("1")
        find(By.ID, "swap").click()
        assert "no face" in _wait(lambda: find(By.ID, "error").text)  # bad input: a message, not a crash
        find(By.ID, "target").clear()
        find(By.ID, "target").send_keys(str(faces_dir / "biden2.jpg"))
        find(By.ID, "swap").click()
        _wait(lambda: find(By.ID, "result").get_attribute("src") or find(By.ID, "error").text)
        assert find(By.ID, "error").text == ""
        assert browser.execute_script("return document.getElementById('result').naturalWidth") == 1200
        find(By.ID, "download").click()
        saved = _wait(lambda: [p for p in downloads.iterdir() if p.suffix == ".jpg"])
    finally:
        browser.quit()
    assert saved[0].name == "obama1-biden2.jpg"
    record = read_image_provenance(saved[0])
    assert record["ai_generated"] and record["steps"] == 1
