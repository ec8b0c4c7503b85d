"""Headless Chromium for the tests that look at a page the way a reader does: one-shot runs that dump
the laid-out DOM (`rendered_dom`), and a `Browser` driven over the DevTools protocol (a websocket) with
the network cut off: any request that does not go to loopback fails (a proxy that is not there, and no
DNS)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

from tests.conftest import unavailable

OFFLINE_FLAGS = (
    # Chromium sends loopback traffic direct and everything else to this proxy, where nothing listens.
    "--proxy-server=http://127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        unavailable("chromium", "not installed", "apt-get install -y chromium")
    return exe


def run_chromium(exe: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--hide-scrollbars",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )


def rendered_dom(exe: str, page: Path, tmp_path: Path) -> str:
    """The DOM after Chromium parsed and laid out the page."""
    return run_chromium(exe, tmp_path, "--dump-dom", page.as_uri()).stdout


def visible_text(dom: str) -> str:
    """The DOM's text with tags dropped and entities decoded, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


class Browser:
    """One page. `evaluate` runs JavaScript in it; `requests` and `failures` record its network."""

    def __init__(self, profile: Path) -> None:
        self.proc = subprocess.Popen(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,2000",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                *OFFLINE_FLAGS,
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self.ws: ClientConnection = connect(f"ws://127.0.0.1:{port}{path}", max_size=None)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Network", "DOM"):
            self.send(f"{domain}.enable", session=True)

    def send(self, method: str, params: dict[str, Any] | None = None, *, session: bool = False) -> Any:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url}, session=True)

    def evaluate(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}, session=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:200]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def type_into(self, selector: str, text: str) -> None:
        """Focus the element, select what it holds and type over it, as a person would."""
        found = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return false;"
            " e.scrollIntoView(); e.focus(); if (e.select) e.select(); return true; })()"
        )
        assert found, f"no element {selector}"
        self.send("Input.insertText", {"text": text}, session=True)
        time.sleep(1)  # forms debounce their inputs (Swagger UI: a few hundred ms) before the state holds them

    def click(self, selector: str) -> None:
        found = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return false;"
            " e.scrollIntoView(); e.click(); return true; })()"
        )
        assert found, f"no element {selector}"

    def set_file(self, selector: str, path: Path) -> None:
        """What the file picker does: put a file into an <input type=file>."""
        node = self.send("DOM.getDocument", {"depth": 0}, session=True)["root"]["nodeId"]
        found = self.send("DOM.querySelector", {"nodeId": node, "selector": selector}, session=True)["nodeId"]
        assert found, f"no element {selector}"
        self.send("DOM.setFileInputFiles", {"nodeId": found, "files": [str(path)]}, session=True)

    def network(self, kind: str) -> list[dict[str, Any]]:
        self.evaluate("1")  # drain what arrived meanwhile
        return [e["params"] for e in self.events if e.get("method") == kind]

    def screenshot(self, path: Path) -> None:
        import base64

        data = self.send("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def poll(fn: Callable[[], Any], what: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
