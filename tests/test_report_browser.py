"""The run report as a person sees it: ``report.html`` of a real run, rendered by a
real browser (Debian's Chromium, headless) on a closed network.

Skipped without Chromium, unless PALFLOW_REQUIRE names ``chromium`` (CI does).

With ``PALFLOW_REPORT_SCREENSHOT=FILE`` the test also writes the whole page, scaled
down, to FILE (``docs/images/report.png`` is made so); the run directory's path on
the page is shown there as ``runs/<campaign name>``, where ``palflow run`` puts a run.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import signal
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

from palflow.pipeline.observe.report import FIGURES, build_report
from tests.test_report import recorded_run  # noqa: F401 (the fixture: a finished campaign)

FLAGS = (
    "--headless",
    "--no-sandbox",  # as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
"""Chromium's switches for a headless render as root, with no network to reach."""

WINDOW = "1280,4000"
"""The browser window, in pixels: wide as a laptop's screen, tall to show most figures."""

WEB_SCHEMES = ("http", "https", "ws", "wss", "ftp")


def chromium(binary: str, profile: Path, *args: str, timeout: float = 120) -> str:
    """Run Chromium with :data:`FLAGS`, a new profile and ``args``; its stdout. The
    whole process group is killed if it outlives ``timeout``."""
    command = [binary, *FLAGS, f"--user-data-dir={profile}", *args]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"chromium ran past {timeout} s: {' '.join(command[1:])}")
    assert process.returncode == 0, err[-3000:]
    return out


def requested_urls(net_log: Path) -> list[str]:
    """The web URLs (http, https, ws, ...) a page asked for, from Chromium's net log.

    Every URL request the log records counts, except those Chromium starts on its own
    behalf (its initiator is ``not an origin``: the clock, the updater, the account
    check) which no flag stops entirely and which are not the page's.
    """
    log = json.loads(net_log.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        if event["type"] != start or "url" not in params:
            continue
        if params.get("initiator") == "not an origin":
            continue
        if urlparse(params["url"]).scheme in WEB_SCHEMES:
            urls.append(params["url"])
    return urls


def linked_resources(page: str) -> list[str]:
    """Every address the HTML loads a resource from: ``src`` and ``href`` attributes,
    ``srcset``, CSS ``url(...)`` and ``@import``."""
    found = re.findall(r"""\b(?:src|href|poster|data)\s*=\s*["']([^"']*)["']""", page, re.I)
    for srcset in re.findall(r"""\bsrcset\s*=\s*["']([^"']*)["']""", page, re.I):
        found += [part.split()[0] for part in srcset.split(",") if part.strip()]
    found += re.findall(r"""url\(\s*["']?([^"')]+)""", page, re.I)
    found += re.findall(r"""@import\s+["']([^"']+)""", page, re.I)
    return [html.unescape(address) for address in found]


PROBE = """<script>
window.addEventListener("load", () => {
  for (const image of document.images)
    image.setAttribute("data-natural",
      `${image.naturalWidth}x${image.naturalHeight}${image.complete ? " complete" : ""}`);
  document.body.setAttribute("data-page-height", document.documentElement.scrollHeight);
});
</script>"""
"""Appended to a copy of the page: once it has loaded, each image records the size the
browser decoded it to, and the body the page's height, for ``--dump-dom`` to show."""


def probed(report: Path, binary: str, profile: Path) -> str:
    """The DOM of ``report`` as Chromium built it, with :data:`PROBE`'s attributes."""
    copy = report.with_name(".report-probe.html")
    copy.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    try:
        return chromium(binary, profile, f"--window-size={WINDOW}", "--dump-dom", copy.as_uri())
    finally:
        copy.unlink()


def test_the_net_log_sees_a_page_that_fetches(require_chromium, tmp_path):
    """The check below can fail: a page that loads a style sheet, an image and a script
    from the web is caught, each request by its URL."""
    page = tmp_path / "fetches.html"
    wanted = [
        "https://fonts.example.invalid/style.css",
        "http://example.invalid/figure.png",
        "https://cdn.example.invalid/plot.js",
    ]
    page.write_text(
        f'<!DOCTYPE html><html><head><link rel="stylesheet" href="{wanted[0]}"></head>'
        f'<body><p>text</p><img src="{wanted[1]}"><script src="{wanted[2]}"></script>'
        "</body></html>"
    )
    net_log = tmp_path / "net.json"
    chromium(
        require_chromium, tmp_path / "profile", f"--log-net-log={net_log}", "--dump-dom",
        page.as_uri(),
    )  # fmt: skip
    assert sorted(requested_urls(net_log)) == sorted(wanted)
    assert sorted(a for a in linked_resources(page.read_text()) if "://" in a) == sorted(wanted)


def non_white(image: np.ndarray) -> np.ndarray:
    """Pixels (of an RGB or RGBA image in [0, 1]) that are not white."""
    return (image[..., :3] < 0.97).any(axis=-1)


@pytest.mark.timeout(400)
def test_the_report_in_a_browser(recorded_run, require_chromium, tmp_path):  # noqa: F811
    root, _ = recorded_run
    report = build_report(root)  # by the code under test, not an older report
    page = report.read_text()

    # Nothing on the page comes from the web: every resource is inline or local.
    for address in linked_resources(page):
        scheme = urlparse(address).scheme
        assert scheme not in WEB_SCHEMES and not address.startswith("//"), address

    # The page as Chromium built it: every figure, under its heading, decoded.
    dom = probed(report, require_chromium, tmp_path / "profile-dom")
    headings = re.findall(r"<h2>(.*?)</h2>", dom)
    assert [html.unescape(h) for h in headings] == list(FIGURES.values())
    images = re.findall(r"<img\b[^>]*>", dom)
    assert len(images) == len(FIGURES), "one image per figure, no other"
    assert [re.search(r'id="(\w+)"', i).group(1) for i in images] == list(FIGURES)
    for image in images:
        source = html.unescape(re.search(r'src="([^"]*)"', image).group(1))
        if source.startswith("data:"):
            assert source.startswith("data:image/png;base64,"), source[:40]
            assert base64.b64decode(source.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        else:  # a local file beside the report, or a file:// URL
            path = Path(unquote(urlparse(source).path)) if "://" in source else Path(source)
            assert (report.parent / path).is_file(), source
        width, height = map(int, re.search(r'data-natural="(\d+)x(\d+) complete"', image).groups())
        assert width > 300 and height > 200, f"{image[:60]}: decoded to {width}x{height}"
    page_height = int(re.search(r'data-page-height="(\d+)"', dom).group(1))

    # The page as a person sees it: a screenshot that is not blank, made offline.
    import matplotlib.image

    shot, net_log = tmp_path / "report.png", tmp_path / "net.json"
    chromium(
        require_chromium,
        tmp_path / "profile-shot",
        f"--screenshot={shot}",
        f"--window-size={WINDOW}",
        f"--log-net-log={net_log}",
        report.as_uri(),
    )
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == tuple(int(n) for n in reversed(WINDOW.split(",")))
    colours = np.unique((255 * pixels[..., :3]).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 100, f"{len(colours)} colours: a blank or text-only page"
    drawn = non_white(pixels)
    assert drawn.mean() > 0.03, f"{drawn.mean():.1%} of the pixels are not white"
    shown = min(page_height, pixels.shape[0])
    assert drawn[:shown].any(axis=1).mean() > 0.5, "most rows of the page hold something"
    assert requested_urls(net_log) == [], "the report asked the web for nothing"

    target = os.environ.get("PALFLOW_REPORT_SCREENSHOT")
    if target:
        save_screenshot(report, require_chromium, tmp_path, Path(target))


def save_screenshot(report: Path, binary: str, tmp_path: Path, target: Path) -> None:
    """The whole page in a window 1200 px wide, scaled to 900 and reduced to 256
    colours, with the run directory shown as ``runs/<name>``."""
    import matplotlib.image
    from PIL import Image

    page = report.read_text()
    name = re.search(r"<h1>palflow run: (.*?)</h1>", page).group(1)
    shown = re.sub(r"(from <code>)[^<]*(</code>)", rf"\g<1>runs/{name}\g<2>", page, count=1)
    copy = report.with_name(".report-screenshot.html")
    copy.write_text(shown)
    full = tmp_path / "full.png"
    try:
        chromium(binary, tmp_path / "profile-docs", f"--screenshot={full}",
                 "--window-size=1200,12000", copy.as_uri())  # fmt: skip
    finally:
        copy.unlink()
    rows = np.flatnonzero(non_white(matplotlib.image.imread(full)).any(axis=1))
    assert rows[-1] < 12000 - 1, "the page is taller than the window: make the window taller"
    with Image.open(full) as image:
        page_only = image.convert("RGB").crop((0, 0, 1200, min(rows[-1] + 40, 12000)))
    small = page_only.resize((900, round(page_only.height * 900 / 1200)), Image.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    small.quantize(256).save(target, optimize=True)
