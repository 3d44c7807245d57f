"""A real headless Chromium driven over the DevTools protocol (no extra package: aiohttp's
websocket client), for tests that click, type and submit like a person.

``Browser`` starts Chromium with a fresh profile and one page; ``goto`` navigates and waits for
the load, ``click`` clicks an element by CSS selector at its centre with real mouse events,
``type`` focuses an input and inserts text as the keyboard would, ``shot`` saves a PNG of the
page or of one element. Cookies live in the profile like in any browser (the page's session).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession, ClientWebSocketResponse, WSMsgType

TIMEOUT = 30.0


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)
"""Headless Chromium for tests: no network of its own, no first-run work, a fixed window."""


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed (Debian package `chromium`)", pytrace=False)
    return path


class Browser:
    def __init__(self) -> None:
        self._profile = tempfile.TemporaryDirectory(
            prefix="metering-cdp-",
            ignore_cleanup_errors=True,  # a late helper's file
        )
        self._proc: asyncio.subprocess.Process | None = None
        self._session: ClientSession | None = None
        self._ws: ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._events: list[tuple[str, dict[str, Any]]] = []
        self._event_seen = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Browser:
        try:
            return await self._start()
        except BaseException:
            await self.__aexit__()
            raise

    async def _start(self) -> Browser:
        profile = Path(self._profile.name)
        self._proc = await asyncio.create_subprocess_exec(
            chromium_path(),
            *CHROMIUM_FLAGS,
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.is_file() and port_file.read_text().strip():
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("chromium did not open its DevTools port")
        port = int(port_file.read_text().split()[0])
        self._session = ClientSession()
        targets: list[dict[str, Any]] = []
        for _ in range(100):
            async with self._session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = [t for t in await resp.json() if t.get("type") == "page"]
            if targets:
                break
            await asyncio.sleep(0.1)
        self._ws = await self._session.ws_connect(
            targets[0]["webSocketDebuggerUrl"], max_msg_size=0
        )
        self._reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self._proc is not None and self._proc.returncode is None:
            # SIGTERM lets Chromium stop its helper processes, which write into the profile
            # until they exit; a kill only if it does not stop.
            self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 10)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        self._profile.cleanup()

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != WSMsgType.TEXT:
                continue
            data = orjson.loads(msg.data)
            if "id" in data:
                fut = self._replies.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            else:
                self._events.append((data.get("method", ""), data.get("params", {})))
                self._event_seen.set()

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        ident = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies[ident] = fut
        await self._ws.send_str(
            orjson.dumps({"id": ident, "method": method, "params": params}).decode()
        )
        reply = await asyncio.wait_for(fut, TIMEOUT)
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def _wait_event(self, name: str) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while True:
            for i, (method, params) in enumerate(self._events):
                if method == name:
                    del self._events[: i + 1]
                    return params
            self._event_seen.clear()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"no {name} within {TIMEOUT:g} s")
            try:
                await asyncio.wait_for(self._event_seen.wait(), left)
            except TimeoutError:
                continue

    async def goto(self, url: str) -> None:
        self._events.clear()
        await self.send("Page.navigate", url=url)
        await self._wait_event("Page.loadEventFired")

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def text(self, selector: str) -> str | None:
        """The visible text of the first element matching ``selector`` (None: no such one)."""
        sel = orjson.dumps(selector).decode()
        value = await self.evaluate(
            f"(() => {{ const e = document.querySelector({sel}); "
            "return e ? e.innerText.replace(/\\s+/g, ' ').trim() : null; })()"
        )
        return None if value is None else str(value)

    async def count(self, selector: str) -> int:
        sel = orjson.dumps(selector).decode()
        return int(await self.evaluate(f"document.querySelectorAll({sel}).length"))

    async def _box(self, selector: str) -> dict[str, float]:
        sel = orjson.dumps(selector).decode()
        box = await self.evaluate(
            f"(() => {{ const e = document.querySelector({sel}); if (!e) return null; "
            "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); "
            "return {x: r.x + window.scrollX, y: r.y + window.scrollY, w: r.width, h: r.height,"
            " vx: r.x, vy: r.y}; })()"
        )
        if box is None:
            raise AssertionError(f"no element {selector!r} on the page")
        return dict(box)

    async def click(self, selector: str, *, navigates: bool = False) -> None:
        """A real mouse click at the element's centre (``navigates``: wait for the new page)."""
        box = await self._box(selector)
        x, y = box["vx"] + box["w"] / 2, box["vy"] + box["h"] / 2
        if navigates:
            self._events.clear()
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
            )
        if navigates:
            await self._wait_event("Page.loadEventFired")

    async def type(self, selector: str, text: str) -> None:
        """Replace an input's value by typing ``text`` into it."""
        await self.click(selector)
        sel = orjson.dumps(selector).decode()
        await self.evaluate(f"document.querySelector({sel}).select()")
        await self.send("Input.insertText", text=text)

    async def shot(self, path: Path, selector: str | None = None) -> None:
        """Save a PNG of the viewport, or of one element (scrolled into view)."""
        params: dict[str, Any] = {"format": "png"}
        if selector is not None:
            box = await self._box(selector)
            params["clip"] = {
                "x": box["x"],
                "y": box["y"],
                "width": max(1.0, box["w"]),
                "height": max(1.0, box["h"]),
                "scale": 1,
            }
            params["captureBeyondViewport"] = True
        data = await self.send("Page.captureScreenshot", **params)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))

    async def url(self) -> str:
        return str(await self.evaluate("location.href"))
