"""A JupyterLab server and a headless Chromium for the browser tests (DESIGN §9, issue 36).

Both are started once per test session by the fixtures below and stopped by them, by their own
process ids, also when a test fails. Nothing is fetched from the network: the server is token-less
on a free loopback port with its own config, data, runtime and IPython folders in a temporary
directory; Chromium runs headless with a fresh profile and networking features off; Playwright
only drives it (over the DevTools protocol), it installs no browser.

The notebooks run on copies in a temporary root (``notebooks/`` beside ``data/`` and ``runs/``, so
their relative default paths resolve there), never on the repository's files. Screenshots (of
failures, and of the viewer and the report as a record) go to ``runs/browser-artifacts/`` or
``$MEDSSL_BROWSER_ARTIFACTS``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_HINT = (
    "the browser test needs Debian's Chromium and the playwright package: "
    "apt-get install chromium && pip install playwright (or pip install -e '.[test]'); "
    ".ci/run installs both"
)
# JupyterLab settings for a test run: every cell in the DOM (no windowing, so every output can be
# checked), no autosave (the copies stay as they are), no news or update checks (offline).
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}
SERVER_START_S = 180


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "browser: drives JupyterLab and report.html in headless Chromium"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots go (kept after the run)."""
    folder = Path(os.environ.get("MEDSSL_BROWSER_ARTIFACTS", ROOT / "runs" / "browser-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def chromium() -> str:
    """The system Chromium; skips the browser tests (one line, saying how to install) without it
    or without the playwright package."""
    # .ci/run sets MEDSSL_REQUIRE_BROWSER=1: there a missing browser fails instead of skipping.
    missing = pytest.fail if os.environ.get("MEDSSL_REQUIRE_BROWSER") == "1" else pytest.skip
    path = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if path is None:
        missing(f"no Chromium found; {INSTALL_HINT}")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing(f"the playwright package is not installed; {INSTALL_HINT}")
    return path


@pytest.fixture(scope="session")
def lab_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch root holding copies of the notebooks (and, once they ran, data/ and runs/)."""
    root = tmp_path_factory.mktemp("lab")
    (root / "notebooks").mkdir()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        shutil.copy2(notebook, root / "notebooks" / notebook.name)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, name: str) -> None:
    """Stop a process this session started, by its pid: SIGTERM, then SIGKILL after 20 s."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
    print(f"stopped {name} (pid {proc.pid})")


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.fixture(scope="session")
def lab_url(
    chromium: str, lab_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Base URL of a token-less JupyterLab on a free loopback port, kernels importing this
    checkout at the smoke profile."""
    home = tmp_path_factory.mktemp("jupyter")
    config = home / "config"
    for plugin, values in LAB_SETTINGS.items():
        path = config / "lab" / "user-settings" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "MEDSSL_PROFILE": "smoke",
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "IPYTHONDIR": str(home / "ipython"),
    }
    port = _free_port()
    log_path = home / "server.log"
    command = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--allow-root",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        "--IdentityProvider.token=",
        "--ServerApp.password=",
        f"--ServerApp.root_dir={lab_root}",
        "--LabApp.expose_app_in_browser=True",
        "--LabApp.extension_manager=readonly",
        "--LabApp.news_url=",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}; log: {log_path}")
            try:
                _get_json(f"{url}/api/status")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer in {SERVER_START_S} s; log: {log_path}")
                time.sleep(0.5)
        print(f"JupyterLab {url} (pid {proc.pid}, log {log_path})")
        yield url
    finally:
        try:  # kernels first, so none outlives the server
            for kernel in _get_json(f"{url}/api/kernels"):
                kernel_url = f"{url}/api/kernels/{kernel['id']}"
                urllib.request.urlopen(urllib.request.Request(kernel_url, method="DELETE")).close()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        _stop(proc, "JupyterLab")


@pytest.fixture(scope="session")
def browser(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Headless Chromium (fresh profile) driven by Playwright over the DevTools protocol."""
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    log_path = profile.parent / "chromium.log"
    command = [
        chromium,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        "about:blank",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    playwright = None
    try:
        port_file = profile / "DevToolsActivePort"  # Chromium writes the port it picked here
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Chromium did not start (exit {proc.poll()}); log: {log_path}")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        playwright = sync_playwright().start()
        connected = playwright.chromium.connect_over_cdp(f"http://127.0.0.1:{port}")
        print(f"Chromium pid {proc.pid}, DevTools port {port}, log {log_path}")
        yield connected
    finally:
        if playwright is not None:
            playwright.stop()
        _stop(proc, "Chromium")


@pytest.fixture()
def on_failure_screenshot(artifacts: Path):
    """``with on_failure_screenshot(page, name):`` keeps a full-page screenshot
    ``<artifacts>/<name>-failure.png`` when the block fails, and prints its path."""

    @contextmanager
    def guard(page, name: str) -> Iterator[None]:
        try:
            yield
        except BaseException:
            path = artifacts / f"{name}-failure.png"
            try:
                page.screenshot(path=str(path), full_page=True)
                print(f"screenshot of the failure: {path}")
            except Exception as err:  # the page may be gone; the original error matters
                print(f"no screenshot of the failure ({err})")
            raise

    return guard
