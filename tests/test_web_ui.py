"""The web UI at ``/``: its files (served offline, with the right types and caching, and the vendored
libraries exactly as pinned), the gallery API behind its Models page (``POST /models/apply`` and its jobs),
and its pages driven in a real browser: Debian's ``chromium`` through Debian's ``chromedriver``, headless,
against a real server process (the tests marked ``model`` use the installed default models).

The browser tests skip only where chromium or chromedriver is absent (``apt-get install chromium
chromium-driver``; ``.ci/run`` installs them). They save screenshots of the chat and speech pages into
``docs/screenshots/`` for the README.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import DEFAULT_MODELS, ServerProcess, default_model_configs
from localai_aio.api.localai.ui import load_assets
from localai_aio.config import ServerSettings
from localai_aio.server import keys

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "src" / "localai_aio" / "web"
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHAT_MODEL, VOICE, WHISPER = "smollm2-135m-instruct", "en-us-joe-medium", "whisper-base"
URL = re.compile(r"https?://[^\s\"'`()<>\\]+")
#: http(s) addresses that may appear in served files: XML namespace names (identifiers, never fetched) and,
#: in the vendored libraries only, links in their comments and error messages. The page's CSP
#: (``connect-src 'self'`` and the like) is what guarantees that nothing is fetched from elsewhere.
NAMESPACES = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xhtml", "http://www.w3.org/1998/Math/MathML"}
VENDOR_LINKS = {
    "http://", "https://github.com/markedjs/marked", "https://github.com/markedjs/marked.",
    "https://bugs.chromium.org/p/chromium/issues/detail?id=1305293",
    "https://github.com/babel/babel/blob/main/packages/babel-helpers/LICENSE",
    "https://github.com/sindresorhus/validate-element-name",
    "https://github.com/highlightjs/highlight.js/issues/2277",
    "https://github.com/highlightjs/highlight.js/wiki/security",
}


# -- the files ------------------------------------------------------------------------------------------------

async def test_index_and_assets_have_types_and_caching(client) -> None:  # noqa: ANN001
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-cache"
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    html = await resp.text()
    assert "{{assets}}" not in html
    again = await client.get("/", headers={"If-None-Match": resp.headers["ETag"]})
    assert again.status == 304

    version = client.server.app[keys.UI_ASSETS].version
    linked = re.findall(r'(?:src|href)="(/ui/assets/[^"]+)"', html)
    assert f"/ui/assets/{version}/js/app.js" in linked and f"/ui/assets/{version}/app.css" in linked
    expected = {".js": "text/javascript; charset=utf-8", ".mjs": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
    for path in [*linked, f"/ui/assets/{version}/vendor/dompurify/purify.es.mjs"]:
        asset = await client.get(path, headers={"Accept-Encoding": "gzip"})
        assert asset.status == 200, path
        assert asset.headers["Content-Type"] == expected[Path(path).suffix], path
        assert asset.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert asset.headers["Content-Encoding"] == "gzip" and asset.headers["X-Content-Type-Options"] == "nosniff"
        assert len(await asset.read()) > 100
        cached = await client.get(path, headers={"Accept-Encoding": "gzip", "If-None-Match": asset.headers["ETag"]})
        assert cached.status == 304
    plain = await client.get(f"/ui/assets/{version}/js/app.js", headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers and (await plain.read()) == (WEB / "js" / "app.js").read_bytes()
    stale = await client.get("/ui/assets/0123456789ab/js/app.js")  # a tab opened before an upgrade
    assert stale.status == 200 and stale.headers["Cache-Control"] == "no-cache"
    for missing in (f"/ui/assets/{version}/nothing.js", f"/ui/assets/{version}/vendor/manifest.json",
                    f"/ui/assets/{version}/../api/ui.py", f"/ui/assets/{version}/vendor/marked/LICENSE"):
        gone = await client.get(missing)
        assert gone.status == 404, missing
        assert set((await gone.json())["error"]) == {"message", "type", "param", "code"}


async def test_every_served_file_works_offline(client) -> None:  # noqa: ANN001
    """No address of another host in any file the UI serves (XML namespace names aside, and the links in
    the vendored libraries' comments, listed above), and modules import only relative paths."""
    assets = client.server.app[keys.UI_ASSETS]
    assert len(assets.files) >= 25
    served = {"index.html": await (await client.get("/")).text()}
    for path in assets.files:
        served[path] = (await (await client.get(f"/ui/assets/{assets.version}/{path}")).read()).decode()
    for path, text in served.items():
        urls = set(URL.findall(text)) - NAMESPACES
        if path.startswith("vendor/"):
            assert urls <= VENDOR_LINKS, (path, urls - VENDOR_LINKS)
        else:
            assert not urls, (path, urls)
        if path.startswith("js/"):  # (the vendored files import nothing; their grammars name the keyword)
            for target in re.findall(r"""(?:\bimport\s*\(?|\bfrom)\s*["']([^"']+)["']""", text):
                assert target.startswith(("./", "../")), (path, target)
        if path.endswith(".css"):
            assert "@import" not in text and "url(" not in text, path


def test_vendored_files_match_the_manifest() -> None:
    """Offline half of scripts/check_web_vendor.py: every vendored file is listed, with its sha256."""
    manifest = json.loads((WEB / "vendor" / "manifest.json").read_text())
    listed = set()
    for pkg in manifest["packages"]:
        assert pkg["version"] and pkg["license"] and pkg["integrity"].startswith("sha512-"), pkg["package"]
        for entry in pkg["files"]:
            data = (WEB / "vendor" / entry["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]
            listed.add(entry["path"])
        assert any(entry["path"].endswith("LICENSE") for entry in pkg["files"]), pkg["package"]
    present = {str(p.relative_to(WEB / "vendor")) for p in (WEB / "vendor").rglob("*")
               if p.is_file() and p.name != "manifest.json"}
    assert present == listed


def test_the_package_data_holds_every_web_file() -> None:
    """What setup.cfg ships is what the server serves (an unlisted file would be missing from the wheel)."""
    import configparser
    from fnmatch import fnmatch

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    patterns = [line.strip() for line in cfg["options.package_data"]["localai_aio"].splitlines()
                if line.strip().startswith("web/")]
    package = WEB.parent
    for path in WEB.rglob("*"):
        if path.is_file():
            relative = str(path.relative_to(package))
            assert any(fnmatch(relative, pattern) and relative.count("/") == pattern.count("/")
                       for pattern in patterns), relative
    assets = load_assets()
    assert "js/app.js" in assets.files and "vendor/marked/marked.esm.js" in assets.files


async def test_ui_models_say_backend_use_cases_and_state(client) -> None:  # noqa: ANN001
    body = await (await client.get("/ui/api/models")).json()
    assert body["gallery_api"] is True
    rows = {row["name"]: row for row in body["data"]}
    assert rows["tiny-llama"] == {"name": "tiny-llama", "backend": "llama-cpp", "usecases": ["chat", "completion"],
                                  "aliases": [], "loaded": False, "error": None}
    assert rows["tiny-ct"]["backend"] == "ctransformers"
    listing = await (await client.get("/v1/models")).json()  # OpenAI's shape is untouched
    assert all(set(m) == {"id", "object", "created", "owned_by"} for m in listing["data"])


async def test_with_keys_the_page_is_public_and_the_api_is_not(make_client, tmp_path: Path,  # noqa: ANN001
                                                               models_dir: Path) -> None:
    client = await make_client(ServerSettings(models_path=str(models_dir), config_dir=str(tmp_path / "d"),
                                              api_keys=("secret",)))
    assert (await client.get("/")).status == 200
    version = client.server.app[keys.UI_ASSETS].version
    assert (await client.get(f"/ui/assets/{version}/js/chat.js")).status == 200
    for method, path in (("GET", "/ui/api/models"), ("POST", "/models/apply"), ("GET", "/models/available"),
                         ("GET", "/models/jobs"), ("GET", "/models/jobs/x")):
        assert (await client.request(method, path, json={"id": "tiny"})).status == 401, path
    ok = await client.get("/ui/api/models", headers={"Authorization": "Bearer secret"})
    assert ok.status == 200


# -- the gallery API -----------------------------------------------------------------------------------------

async def test_apply_refuses_what_is_not_a_gallery_entry(client) -> None:  # noqa: ANN001
    resp = await client.post("/models/apply", json={"id": "no-such-model"})
    assert resp.status == 404
    err = (await resp.json())["error"]
    assert "not in the gallery" in err["message"] and err["param"] == "id"
    resp = await client.post("/models/apply", json={})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "id"
    resp = await client.post("/models/apply", json={"url": "github:go-skynet/model-gallery/x.yaml"})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "url"
    resp = await client.post("/models/apply", json={"id": 3})
    assert resp.status == 400
    assert (await client.get("/models/jobs/nope")).status == 404
    entries = await (await client.get("/models/available")).json()
    assert "smollm2-135m-instruct" in {e["name"] for e in entries}


async def test_gallery_api_can_be_turned_off(make_client, tmp_path: Path) -> None:  # noqa: ANN001
    client = await make_client(ServerSettings(models_path=str(tmp_path / "m"), config_dir=str(tmp_path / "d"),
                                              disable_gallery_api=True))
    for method, path in (("POST", "/models/apply"), ("GET", "/models/available"), ("GET", "/models/jobs"),
                         ("GET", "/models/jobs/x")):
        resp = await client.request(method, path, json={"id": "smollm2-135m-instruct"})
        assert resp.status == 403, path
        err = (await resp.json())["error"]
        assert err["code"] == "gallery_api_disabled" and "--disable-gallery-api" in err["message"]
    assert (await (await client.get("/ui/api/models")).json())["gallery_api"] is False


def test_disable_gallery_api_flag_and_environment() -> None:
    from localai_aio.cli import build_parser
    from localai_aio.config import load_settings

    args = build_parser().parse_args(["serve", "--disable-gallery-api"])
    flags = {k: v for k, v in vars(args).items() if k not in {"command", "func"}}
    assert load_settings(flags, environ={}).disable_gallery_api is True
    assert load_settings({}, environ={"LOCALAI_DISABLE_GALLERY_API": "1"}).disable_gallery_api is True
    assert load_settings({}, environ={}).disable_gallery_api is False


async def test_install_job_of_a_local_gallery_entry(make_client, tmp_path: Path,  # noqa: ANN001
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """POST /models/apply runs the CLI's installer (pip fetches the entry's wheel from a local folder here),
    the job reports its progress, and the model is served when it is done, without a restart."""
    from test_gallery import PAYLOAD, build_wheel, write_gallery

    wheels = build_wheel(tmp_path / "wheels").parent
    monkeypatch.setenv("LOCALAI_GALLERY", str(write_gallery(tmp_path / "g.yaml", hashlib.sha256(PAYLOAD).hexdigest())))
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    models = tmp_path / "models"
    models.mkdir()
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"),
                                              watch_models=False))
    assert [e["installed"] for e in await (await client.get("/models/available")).json()] == [False]
    resp = await client.post("/models/apply", json={"id": "localai@tiny"})  # LocalAI's gallery@name form
    assert resp.status == 200
    job = await resp.json()
    assert job["status"].endswith(f"/models/jobs/{job['uuid']}")
    status = await _wait_for_job(client, job["uuid"])
    assert status["error"] is None, status
    assert status["progress"] == 100 and "installed" in status["message"] and status["gallery_model_name"] == "tiny"
    assert (models / "tiny" / "model.bin").read_bytes() == PAYLOAD
    ids = [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]
    assert ids == ["tiny", "gpt-4"]  # served at once: the registry was reloaded (the watcher is off)
    assert [e["installed"] for e in await (await client.get("/models/available")).json()] == [True]
    again = await (await client.post("/models/apply", json={"name": "tiny"})).json()
    assert "already installed" in (await _wait_for_job(client, again["uuid"]))["message"]
    assert set(await (await client.get("/models/jobs")).json()) == {job["uuid"], again["uuid"]}


async def test_a_failed_install_is_reported_by_its_job(make_client, tmp_path: Path,  # noqa: ANN001
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from test_gallery import build_wheel, write_gallery

    wheels = build_wheel(tmp_path / "wheels").parent
    monkeypatch.setenv("LOCALAI_GALLERY", str(write_gallery(tmp_path / "g.yaml", "0" * 64)))
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    client = await make_client(ServerSettings(models_path=str(tmp_path / "models"), config_dir=str(tmp_path / "d")))
    job = await (await client.post("/models/apply", json={"id": "tiny"})).json()
    status = await _wait_for_job(client, job["uuid"])
    assert status["processed"] and "checksum mismatch" in status["error"] and "nothing was written" in status["error"]
    assert (await (await client.get("/v1/models")).json())["data"] == []


async def _wait_for_job(client, uuid: str, timeout: float = 120) -> dict[str, Any]:  # noqa: ANN001
    import asyncio

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = await (await client.get(f"/models/jobs/{uuid}")).json()
        assert 0 <= status["progress"] <= 100
        if status["processed"]:
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {uuid} did not finish: {status}")


# -- in a browser --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,800",
                "--autoplay-policy=no-user-gesture-required", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(condition: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or condition}")


def open_page(driver: Any, server: ServerProcess, page: str) -> None:
    driver.get(f"{server.url}/#/{page}")
    wait_for(lambda: driver.execute_script(f"return document.getElementById('page-{page}').dataset.ready"),
             what=f"the {page} page")


def screenshot(driver: Any, name: str) -> None:
    """Refresh the README's screenshots only when asked (LOCALAI_UPDATE_SCREENSHOTS=1): a test run leaves
    the checkout as it found it. Otherwise the picture is still taken, so that taking it is tested."""
    folder = SCREENSHOTS if os.environ.get("LOCALAI_UPDATE_SCREENSHOTS") == "1" else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(folder / name))
    assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def severe_console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.fixture
def tiny_server(server_process, models_dir: Path):  # noqa: ANN001, ANN201
    def start(*args: str) -> ServerProcess:
        return server_process("--models-path", str(models_dir), "--config-dir", "data", "--threads", "1", *args)

    return start


def test_browser_loads_every_page_from_this_server_only(browser, tiny_server) -> None:  # noqa: ANN001
    """Every page starts without a console error, every resource comes from the server itself, every control
    has a label, and a phone-sized window needs no sideways scrolling."""
    server = tiny_server()
    for page in ("chat", "speech", "transcribe", "images", "models"):
        open_page(browser, server, page)
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(name.startswith(server.url + "/") for name in resources), resources
    unlabeled = browser.execute_script("""
        return [...document.querySelectorAll('input, select, textarea')]
          .filter(el => el.type !== 'hidden' && !el.labels.length && !el.getAttribute('aria-label'))
          .map(el => el.id || el.outerHTML)""")
    assert unlabeled == []
    assert severe_console_errors(browser) == []
    browser.set_window_size(390, 844)
    try:
        for page in ("chat", "models", "speech"):
            open_page(browser, server, page)
            assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"), page
    finally:
        browser.set_window_size(1280, 800)


def test_browser_asks_for_the_key_once(browser, tiny_server) -> None:  # noqa: ANN001
    server = tiny_server("--api-keys", "right-key")
    browser.get(server.url + "/")
    dialog_open = "return document.getElementById('key-dialog').open"
    wait_for(lambda: browser.execute_script(dialog_open), what="the key prompt")
    field = browser.find_element("id", "key-input")
    field.send_keys("wrong-key\n")
    error = wait_for(lambda: browser.find_element("id", "key-error").text, what="the wrong key's error")
    assert "refused" in error and "Incorrect API key" in error
    assert browser.execute_script(dialog_open)
    field.clear()
    field.send_keys("right-key\n")
    wait_for(lambda: not browser.execute_script(dialog_open), what="the dialog to close")
    wait_for(lambda: browser.execute_script("return document.getElementById('page-chat').dataset.ready"))
    options = browser.execute_script("return [...document.getElementById('chat-model').options].map(o => o.value)")
    assert sorted(options) == ["tiny-ct", "tiny-llama"]
    assert browser.execute_script("return sessionStorage.getItem('localai-aio.api-key')") == "right-key"
    browser.refresh()  # kept for the tab: no second prompt
    wait_for(lambda: browser.execute_script("return document.getElementById('page-chat').dataset.ready"))
    assert not browser.execute_script(dialog_open)
    browser.get_log("browser")  # the 401s the console logged are this test's point, not another test's errors


# -- in a browser, with the default models ------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    default_model_configs(CHAT_MODEL, VOICE, WHISPER)
    root = tmp_path_factory.mktemp("web-ui")
    server = ServerProcess(["--models-path", str(DEFAULT_MODELS.resolve()), "--config-dir", str(root / "data"),
                            "--preload-models", CHAT_MODEL], cwd=root)
    server.start(root / "server.log", timeout=120)
    yield server
    server.stop()


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def busy_slots(server: ServerProcess) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    match = re.search(rf'^localai_model_slots_busy\{{model="{CHAT_MODEL}"\}} (\S+)$', text, re.M)
    assert match, text
    return float(match.group(1))


def set_field(driver: Any, element_id: str, value: str) -> None:
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(value)


def start_chat(driver: Any, server: ServerProcess, question: str, max_tokens: str = "") -> None:
    open_page(driver, server, "chat")
    driver.find_element("id", "chat-new").click()
    driver.find_element("css selector", "#chat-settings summary").click()
    set_field(driver, "chat-temperature", "0")
    set_field(driver, "chat-max-tokens", max_tokens)
    driver.find_element("css selector", "#chat-settings summary").click()
    driver.find_element("id", "chat-input").send_keys(question)


ANSWER = "return document.querySelector('#chat-messages .message.assistant:last-child')"


@pytest.mark.model
def test_chat_streams_the_answer_token_by_token(browser, model_server: ServerProcess) -> None:  # noqa: ANN001
    question = "What is the capital of France?"
    raw = post_json(model_server.url + "/v1/chat/completions", {
        "model": CHAT_MODEL, "temperature": 0, "messages": [{"role": "user", "content": question}]})
    assert "Paris" in raw["choices"][0]["message"]["content"]  # what the page must show

    start_chat(browser, model_server, question)
    # every change of the answer's text, as the page makes it
    browser.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
          const answer = document.querySelector('#chat-messages .message.assistant:last-child .content');
          if (answer) window.seen.push(answer.textContent.length);
        }).observe(document.getElementById('chat-messages'), {subtree: true, childList: true, characterData: true});""")
    browser.find_element("id", "chat-input").send_keys("\n")  # Enter sends
    wait_for(lambda: browser.execute_script(ANSWER + "?.dataset.state === 'done'"), 60, "the answer")
    text = browser.execute_script(ANSWER + ".querySelector('.content').textContent")
    assert "Paris" in text
    lengths = [n for n in browser.execute_script("return window.seen") if 0 < n < len(text)]
    assert len(set(lengths)) >= 2 and lengths == sorted(lengths), lengths  # it grew, piece by piece
    stats = browser.execute_script(ANSWER + ".querySelector('.stats').textContent")
    assert re.search(r"[\d.]+ tokens/s · first token [\d.]+ s · \d+ tokens", stats), stats
    saved = json.loads(browser.execute_script("return localStorage.getItem('localai-aio.conversations')"))
    assert "Paris" in saved[0]["messages"][-1]["content"]  # kept in localStorage
    assert severe_console_errors(browser) == []
    screenshot(browser, "chat.png")


@pytest.mark.model
def test_chat_stop_aborts_and_frees_the_model(browser, model_server: ServerProcess) -> None:  # noqa: ANN001
    start_chat(browser, model_server, "Write a very long story about a dragon who learns to bake bread, "
                                      "in ten chapters.", max_tokens="3000")
    browser.find_element("id", "chat-send").click()
    length = ANSWER + "?.querySelector('.content').textContent.length || 0"
    # the first token comes after the prompt is computed, which takes a while on a busy machine
    wait_for(lambda: browser.execute_script(length) > 0, 60, "the first token")
    polls = []
    while len(polls) < 4:  # the answer grows across polls: it is streamed
        time.sleep(0.25)
        polls.append(browser.execute_script(length))
        assert browser.execute_script(ANSWER + ".dataset.state") == "streaming", polls
    assert polls == sorted(polls) and polls[-1] > polls[0], polls
    assert busy_slots(model_server) == 1
    browser.find_element("id", "chat-stop").click()
    wait_for(lambda: browser.execute_script(ANSWER + ".dataset.state === 'stopped'"), 10, "the stop")
    wait_for(lambda: busy_slots(model_server) == 0, 10, "the model's slot to be freed")
    stopped_at = browser.execute_script(length)
    time.sleep(0.5)
    assert browser.execute_script(length) == stopped_at  # nothing more arrives
    assert "stopped" in browser.execute_script(ANSWER + ".querySelector('.stats').textContent")


@pytest.mark.model
def test_speech_plays_what_streams(browser, model_server: ServerProcess) -> None:  # noqa: ANN001
    open_page(browser, model_server, "speech")
    set_field(browser, "speech-text", "Hello from the web page. This sentence is spoken on this machine.")
    browser.find_element("id", "speech-go").click()
    wait_for(lambda: browser.execute_script("return document.getElementById('page-speech').dataset.state === 'done'"),
             60, "the speech")
    duration = wait_for(lambda: browser.execute_script(
        "const a = document.getElementById('speech-audio'); return isFinite(a.duration) && a.duration > 0 "
        "&& !a.error && a.duration"), 15, "playable audio")
    assert duration > 1
    link = browser.find_element("id", "speech-download")
    assert link.is_displayed() and link.get_attribute("href").startswith("blob:")
    assert severe_console_errors(browser) == []
    screenshot(browser, "speech.png")


@pytest.mark.model
def test_transcribe_an_uploaded_wav(browser, model_server: ServerProcess, tmp_path: Path) -> None:  # noqa: ANN001
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    wav = tmp_path / "fox.wav"
    wav.write_bytes(subprocess.run(["espeak-ng", "--stdout", "The quick brown fox jumps over the lazy dog"],
                                   capture_output=True, check=True).stdout)
    open_page(browser, model_server, "transcribe")
    browser.find_element("id", "transcribe-file").send_keys(str(wav))
    browser.find_element("id", "transcribe-go").click()
    wait_for(lambda: browser.execute_script("return document.getElementById('page-transcribe').dataset.state "
                                            "=== 'done'"), 60, "the transcription")
    assert "lazy dog" in browser.find_element("id", "transcribe-text").text.lower()
    rows = browser.find_elements("css selector", "#transcribe-segments tbody tr")
    assert rows and rows[0].find_elements("tag name", "td")[0].text.startswith("0:0")
