"""The app in a real browser: headless Chromium (Debian's `chromium`) loads the page, gets two views
uploaded, a point clicked, and a screenshot of the results, which the test inspects.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages
ended by NUL bytes on file descriptors 3 and 4), so no driver library is needed. Run it with
`pytest -m slow tests/test_app_browser.py -s` (it prints where the screenshot is); it is skipped
when chromium is not installed (`apt-get install chromium`).
"""

import base64
import io
import json
import os
import select
import shutil
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from fit3d_hf import FiT3DModel, app
from fit3d_hf.backbone_specs import load_backbone_spec

CHROMIUM = shutil.which("chromium")
# Headless, and no connections of its own: only the page on 127.0.0.1 is loaded.
CHROMIUM_FLAGS = (
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
    "--disable-component-update --disable-sync --disable-extensions --remote-debugging-pipe"
)
WINDOW = (1400, 1800)

pytestmark = pytest.mark.slow


class Chromium:
    """A headless Chromium driven over the DevTools protocol on a pipe."""

    def __init__(self, profile):
        to_browser_read, self.to_browser = os.pipe()
        self.from_browser, from_browser_write = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4.
        command = (
            f"exec 3<&{to_browser_read} 4>&{from_browser_write} {to_browser_read}<&- {from_browser_write}>&-; "
            f"exec {CHROMIUM} {CHROMIUM_FLAGS} --user-data-dir={profile} about:blank"
        )
        self.process = subprocess.Popen(
            ["bash", "-c", command],
            pass_fds=(to_browser_read, from_browser_write),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self.buffer, self.last_id = b"", 0

    def send(self, method, params=None, session=None, timeout=60):
        """Send one command and return its result (events in between are skipped)."""
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self.buffer:
                ready, _, _ = select.select([self.from_browser], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise TimeoutError(f"no reply to {method} within {timeout} s")
                chunk = os.read(self.from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited (code {self.process.poll()}) while waiting for {method}")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url):
        """A new tab of `WINDOW` size on `url`; returns its session id."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        width, height = WINDOW
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session,
        )
        self.send("Page.navigate", {"url": url}, session)
        return session

    def evaluate(self, session, expression):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, session, expression, what, timeout=90):
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(session, expression)
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"the page did not show {what} within {timeout} s")

    def upload(self, session, selector, path):
        root = self.send("DOM.getDocument", {"depth": 0}, session)["root"]["nodeId"]
        node = self.send("DOM.querySelector", {"nodeId": root, "selector": selector}, session)["nodeId"]
        if not node:
            raise RuntimeError(f"no element {selector!r} on the page")
        self.send("DOM.setFileInputFiles", {"nodeId": node, "files": [str(path)]}, session)

    def click(self, session, x, y):
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}, session)

    def screenshot(self, session):
        data = self.send("Page.captureScreenshot", {"format": "png"}, session)["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.to_browser)
        os.close(self.from_browser)


# The three result pictures once shown (loaded, no progress overlay): their natural size and place on the page.
PICTURES_JS = """(() => {
  const images = [0, 1, 2].map(i => document.querySelector(`#picture-${i} img`));
  if (images.some(img => !img || !img.complete || img.naturalWidth === 0)) return null;
  const busy = [...document.querySelectorAll('#picture-0 .wrap, #picture-1 .wrap, #picture-2 .wrap')];
  if (busy.some(status => !status.classList.contains('hide'))) return null;
  return images.map(img => { const r = img.getBoundingClientRect();
    return {width: img.naturalWidth, height: img.naturalHeight, left: r.left, top: r.top, right: r.right, bottom: r.bottom}; });
})()"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package: apt-get install chromium)")
def test_a_browser_uploads_views_clicks_and_sees_the_pictures(tmp_path):
    demo = app.build_app(FiT3DModel.from_backbone(load_backbone_spec("embedded")[0]))
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    browser = Chromium(tmp_path / "profile")
    try:
        session = browser.open(demo.local_url)
        browser.wait_for(session, "document.querySelector('#view-2 input[type=file]') !== null", "the upload fields")
        view_1, view_2 = app.example_views()[0]
        browser.upload(session, "#view-1 input[type=file]", view_1)
        browser.wait_for(session, PICTURES_JS, "the pictures of view 1")
        browser.upload(session, "#view-2 input[type=file]", view_2)
        # Two views: every picture gets a second column of 320 px tiles (160x120 views enlarged twice).
        two_views = f"(() => {{ const p = {PICTURES_JS}; return p && p.every(q => q.width === 644) ? p : null; }})()"
        browser.wait_for(session, two_views, "the pictures of both views")
        notes = browser.evaluate(session, "document.querySelector('#notes').innerText")
        # A click on view 1 at 1/4 of its width and 3/4 of its height moves the point there.
        box = browser.wait_for(
            session,
            "(() => { const r = document.querySelector('#view-1 img')?.getBoundingClientRect(); "
            "return r && r.width > 0 ? [r.left, r.top, r.width, r.height] : null; })()",
            "view 1",
        )
        browser.click(session, box[0] + 0.25 * box[2], box[1] + 0.75 * box[3])
        point = browser.wait_for(
            session,
            "(() => { const x = +document.querySelector('#point-x input[type=number]').value, "
            "y = +document.querySelector('#point-y input[type=number]').value; "
            "return Math.abs(x - 0.5) > 0.01 ? [x, y] : null; })()",
            "the clicked point",
        )
        assert point == pytest.approx([0.25, 0.75], abs=0.03)
        # The redraw for the new point: the best matches in the notes change, then the pictures settle.
        browser.wait_for(session, f"document.querySelector('#notes').innerText !== {json.dumps(notes)}", "the new matches")
        pictures = browser.wait_for(session, two_views, "the pictures after the click")
        screenshot = browser.screenshot(session)
    finally:
        browser.close()
        demo.close()
    path = tmp_path / "app.png"
    screenshot.save(path)
    print(f"screenshot: {path}")
    pixels = np.asarray(screenshot).astype(float)
    for picture in pictures:
        assert (picture["width"], picture["height"]) == (644, 728)
        crop = pixels[int(picture["top"]) : int(picture["bottom"]), int(picture["left"]) : int(picture["right"])]
        assert crop.shape[0] > 50 and crop.shape[1] > 50, f"picture shown too small: {picture}"
        # Present and not blank: many colours, mostly not the white page behind it.
        assert crop.std() > 20
        assert (crop.min(axis=2) > 245).mean() < 0.2
