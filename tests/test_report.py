"""`cskd report`: the page gathers every output that exists, and a real headless Chromium shows all of it.

The run is a real tiny `cskd align` run (toy teacher cache, timm test_resnet, 6 steps). The evaluate, neighbours
and attention outputs are made by hand in the layout those commands write (brief: run-directory conventions),
with real PNGs from matplotlib/PIL and real metrics from `cskd_cache.evaluate.metrics`. Folder names with spaces, '#' and
'<b>' check URL quoting and HTML escaping end to end.

The browser tests drive Debian's `chromium` over the DevTools protocol on a pipe (--remote-debugging-pipe), so
they need no Python package; they skip, saying why, where Chromium is not installed (.ci/install-chromium).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from _imgs import make_images, photo
from cskd_cli.main import app
from typer.testing import CliRunner

from cskd_cache.evaluate.metrics import evaluate_predictions
from cskd_cache.inspect.report import format_value
from cskd_cache.stages.align import AlignConfig, run_align
from cskd_cache.stages.extract import ExtractConfig, run_extract

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"
ATTN = "attn <b>#1 & co"  # needs escaping in text and quoting in URLs


pytestmark = pytest.mark.usefixtures("one_thread")


def _plot(path: Path, kind: str, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(4, 3), dpi=60)
    if kind == "scatter":
        y = rng.uniform(2, 8, 80)
        ax.scatter(y, y + rng.normal(0, 0.8, 80), s=6)
    else:
        ax.plot(np.arange(12), rng.random(12))
    ax.set_title(kind)
    fig.savefig(path)
    plt.close(fig)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    make_images(d / "imgs", 16)
    run_extract(ExtractConfig(teacher="py:toy_teacher:make", out=str(d / "cache"), images=[str(d / "imgs")],
                              num_workers=0))
    run_dir = d / "run"
    run_align(AlignConfig(cache=str(d / "cache"), student="timm:test_resnet", out=str(run_dir), size=32,
                          batch_size=4, num_workers=0, eval_fraction=0.25, max_steps=6, log_every=1))

    ev = run_dir / "eval" / "test"  # two levels down, as `cskd evaluate --out RUN/eval/test` leaves it
    ev.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y = rng.uniform(2, 8, 120)
    m = evaluate_predictions(y, y + rng.normal(0, 1.0, 120), threshold=5.0, n_boot=200)
    (ev / "metrics.json").write_text(json.dumps({**m, "note": "<script>alert(1)</script> & co"}))
    _plot(ev / "scatter.png", "scatter", 1)
    (ev / "predictions.csv").write_text("key,score\n")

    attn = run_dir / "analysis" / ATTN
    attn.mkdir(parents=True)
    layers = [{"layer": i, "distance": [10.0 + i, 20.0 + i], "entropy": [1.0, 2.0], "prefix_mass": [0.1, 0.3]}
              for i in range(3)]  # the attention.json layout of cskd_cache.inspect.attention, values made up
    (attn / "attention.json").write_text(json.dumps({"format": "cskd-attention", "version": 1, "seed": 0, "models": [
        {"label": "vit", "spec": "timm:test_vit", "num_heads": 2, "images": 4, "layers": layers}]}))
    _plot(attn / "attention_distance.png", "distance", 2)
    _plot(attn / "attention_entropy.png", "entropy", 3)

    nb = d / "elsewhere" / "nbrs"  # outside the run: reached with --include
    (nb / "sheets").mkdir(parents=True)
    for i in range(2):
        photo(96, 64, 50 + i).save(nb / "sheets" / f"q{i:03d}.png")
    (nb / "neighbors.json").write_text(json.dumps({"k": 5, "knn_probe": {"acc": 0.71, "acc_ci": [0.6, 0.8]},
                                                   "queries": [{"key": f"q{i}"} for i in range(40)]}))
    (nb / "index.html").write_text('<html><body><img src="sheets/q000.png" alt="q0"></body></html>')
    return d


class Page(HTMLParser):
    """What a reader sees: images (src, alt, caption), section titles, text, tags and links."""

    def __init__(self, text: str):
        super().__init__()
        self.imgs, self.h2, self.tags, self.hrefs, self.rows = [], [], set(), [], []
        self._in, self._row, self._cell = None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.imgs.append({"src": a.get("src"), "alt": a.get("alt"), "caption": None})
        elif tag == "a":
            self.hrefs.append(a["href"])
        elif tag in ("h2", "figcaption"):
            self._in, self._text = tag, ""
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == self._in == "h2":
            self.h2.append(self._text)
        elif tag == self._in == "figcaption":
            self.imgs[-1]["caption"] = self._text
        if tag == self._in:
            self._in = None
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr":
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._in:
            self._text += data
        if self._cell is not None:
            self._cell += data

    def row(self, first: str) -> list[str]:
        hits = [r for r in self.rows if r and r[0] == first]
        assert len(hits) == 1, (first, hits)
        return hits[0]


def report(*args):
    return runner.invoke(app, ["report", *map(str, args)])


def test_page_gathers_every_output_that_exists(run):
    run_dir, nb = run / "run", run / "elsewhere" / "nbrs"
    r = report(run_dir, "--include", nb, "--last", "2")
    assert r.exit_code == 0, r.output
    assert "cskd report ->" in r.output and "images" in r.output
    out = run_dir / "report.html"
    text = out.read_text()
    p = Page(text)
    assert p.h2 == ["Run: run", "Evaluation: eval/test", f"Neighbours: {nb.resolve()}", f"Attention: analysis/{ATTN}"]

    # every image: alt text, a caption, a relative path to the real file
    names = sorted(unquote(i["src"]).rsplit("/", 1)[-1] for i in p.imgs)
    assert names == ["attention_distance.png", "attention_entropy.png", "loss_curve.png", "q000.png", "q001.png",
                     "scatter.png"]
    for img in p.imgs:
        assert img["alt"] and img["caption"], img
        assert not img["src"].startswith(("/", "file:", "data:"))
        assert (out.parent / unquote(img["src"])).read_bytes()[:8] == PNG
    assert "%23" in text and "%3Cb%3E" in text  # '#' and '<' quoted in paths, not cut off as a fragment

    # self-contained and escaped: no script, no external resource, hand-written markup shown as text
    assert not p.tags & {"script", "link", "iframe", "object"}
    assert "://" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in text and "<b>#1" not in text

    # metrics.json: values with their bootstrap interval beside them, the _ci fields not listed again
    m = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())
    for name in ("srcc", "plcc"):
        lo, hi = m[f"{name}_ci"]
        assert p.row(name)[1] == f"{m[name]:.4g} [{lo:.4g}, {hi:.4g}]"
        assert not [r for r in p.rows if r and r[0] == f"{name}_ci"]
    assert p.row("acc")[1] == format_value(m["acc"]) and p.row("n")[1] == "120"
    assert p.row("knn_probe.acc")[1] == "0.71 [0.6, 0.8]" and p.row("queries")[1] == "list of 40"

    # metrics.jsonl: the last 2 eval records (one per epoch, plus step 0), step first; train summary first/last/min
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in records if e["type"] == "eval"]
    assert len(evals) >= 3 and f"(last 2 of {len(evals)})" in text
    want = [[str(e["step"]), str(e["epoch"]), format_value(e["global_cos"], 3)] for e in evals[-2:]]  # 3 digits
    cols = next(r for r in p.rows if r[:2] == ["step", "epoch"])
    at = cols.index("global_cos")
    shown = [[r[0], r[1], r[at]] for r in p.rows if len(r) == len(cols) and r[0].isdigit()]
    assert shown == want
    loss = p.row("loss")
    train = [t for t in records if t["type"] == "train"]
    assert loss[1:] == [format_value(train[0]["loss"], 3), format_value(train[-1]["loss"], 3),
                        format_value(min(t["loss"] for t in train), 3)]

    # attention.json: per layer, each per-head list averaged over the heads
    assert "Per layer: vit, mean of 2 heads" in text
    # layers numbered from 1 (attention.json's layer 2 is the third block), as the attention plots number them
    assert [r for r in p.rows if r[:1] == ["3"] and len(r) == 4] == [["3", "17", "1.5", "0.2"]]

    # config.yaml as YAML, student.json as a table, companion files linked
    assert "student: timm:test_resnet" in text and "total_steps: 6" in text
    assert p.row("spec")[1] == "timm:test_resnet"
    for name in ("predictions.csv", "index.html"):
        hits = [h for h in p.hrefs if h.endswith(name)]
        assert len(hits) == 1 and (out.parent / unquote(hits[0])).is_file()


def test_sections_appear_only_when_their_files_exist_and_a_missing_curve_is_drawn(run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(run / "run" / name, bare / name)
    r = report(bare, "--out", tmp_path / "pages" / "bare.html")
    assert r.exit_code == 0, r.output
    drawn = tmp_path / "pages" / "bare.loss_curve.png"
    assert drawn.read_bytes()[:8] == PNG and sorted(os.listdir(bare)) == ["config.yaml", "metrics.jsonl"]
    p = Page((tmp_path / "pages" / "bare.html").read_text())
    assert p.h2 == ["Run: bare"] and [i["src"] for i in p.imgs] == ["bare.loss_curve.png"]

    r = report(bare)  # the default page sits in the run, and so does the curve it draws
    assert r.exit_code == 0, r.output
    assert (bare / "loss_curve.png").read_bytes()[:8] == PNG
    assert [i["src"] for i in Page((bare / "report.html").read_text()).imgs] == ["loss_curve.png"]

    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "metrics.json").write_text(json.dumps({"srcc": 0.812, "srcc_ci": [0.79, 0.83], "split": "test"}))
    assert report(ev).exit_code == 0
    p = Page((ev / "report.html").read_text())
    assert p.h2 == ["Evaluation: ev"] and p.imgs == []
    assert p.row("srcc")[1] == "0.812 [0.79, 0.83]" and p.row("split")[1] == "test"


def test_out_elsewhere_links_back_and_embed_makes_one_file(run, tmp_path):
    out = tmp_path / "site" / "deep" / "r.html"
    assert report(run / "run", "--out", out).exit_code == 0
    p = Page(out.read_text())
    assert len(p.imgs) == 4 and all(i["src"].startswith("../") for i in p.imgs)
    for img in p.imgs:
        assert (out.parent / unquote(img["src"])).resolve().is_relative_to((run / "run").resolve())

    one = tmp_path / "share.html"
    r = report(run / "run", "--include", run / "elsewhere" / "nbrs", "--out", one, "--embed")
    assert r.exit_code == 0 and "(embedded)" in r.output
    p = Page(one.read_text())
    assert len(p.imgs) == 6 and p.hrefs == [a for a in p.hrefs if a.startswith("#")]
    decoded = sorted(base64.b64decode(i["src"].split(",", 1)[1]) for i in p.imgs)
    files = sorted(f.read_bytes() for f in [*(run / "run").rglob("*.png"), *(run / "elsewhere").rglob("*.png")])
    assert all(i["src"].startswith("data:image/png;base64,") for i in p.imgs) and decoded == files


def test_every_option_has_help_and_max_images_caps_a_section(run, tmp_path):
    import typer.main

    command = typer.main.get_command(app).commands["report"]
    assert all(p.help for p in command.params), [p.name for p in command.params if not p.help]
    out = tmp_path / "capped.html"
    r = report(run / "run", "--include", run / "elsewhere" / "nbrs", "--out", out, "--max-images", "1")
    assert r.exit_code == 0, r.output
    p = Page(out.read_text())
    assert sum("Neighbour sheet" in i["caption"] for i in p.imgs) == 1
    assert "1 more sheets not shown (raise --max-images)" in out.read_text()


def test_bad_input_is_one_line_exit_1_and_writes_nothing(run, tmp_path):
    for args, needle in (([tmp_path / "nope"], "no such directory"),
                         ([tmp_path], "nothing to report"),
                         ([run / "run", "--include", tmp_path / "gone"], "--include"),
                         ([run / "run", "--out", tmp_path], "is a directory")):
        (tmp_path / "notes.txt").write_text("not a run")
        r = report(*args)
        assert r.exit_code == 1, (args, r.output)
        assert needle in r.stderr and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:"), r.stderr
    # A damaged file anywhere fails the whole report, and nothing is left behind: not even the loss curve that
    # would have been drawn for the run before the damaged file was reached.
    bad = tmp_path / "bad"
    (bad / "eval").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(run / "run" / name, bad / name)
    (bad / "eval" / "metrics.json").write_text('{"srcc": 0.8,')
    r = report(bad)
    assert r.exit_code == 1 and "eval/metrics.json: cannot read it as JSON" in r.stderr, r.stderr
    assert sorted(os.listdir(bad)) == ["config.yaml", "eval", "metrics.jsonl"]
    assert os.listdir(bad / "eval") == ["metrics.json"]


# ---------------------------------------------------------------------------------------------- browser


class Chromium:
    """Real headless Chromium over the DevTools protocol on a pipe: we write commands to its fd 3 and read
    answers and events from its fd 4, each a JSON message ending in NUL (what --remote-debugging-pipe speaks)."""

    def __init__(self, exe: str, profile: Path):
        to_browser, self._cmd = os.pipe()
        self._ans, from_browser = os.pipe()

        def fds_3_and_4():  # in the child: our pipe ends to fds 3 and 4 (via fds >= 10, so neither clobbers the other)
            a = fcntl.fcntl(to_browser, fcntl.F_DUPFD_CLOEXEC, 10)
            b = fcntl.fcntl(from_browser, fcntl.F_DUPFD_CLOEXEC, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.log = profile / "chromium.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-pipe",
                 "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=fds_3_and_4, close_fds=False)
        os.close(to_browser)
        os.close(from_browser)
        self.screenshot_to: Path | None = None  # set before a check() to keep a full-page PNG of that page
        self._q: queue.Queue = queue.Queue()
        self._events: list[dict] = []
        self._id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        while chunk := os.read(self._ans, 1 << 16):
            buf += chunk
            *msgs, buf = buf.split(b"\0")
            for m in msgs:
                self._q.put(json.loads(m))
        self._q.put(None)

    def _next(self, timeout: float) -> dict:
        try:
            msg = self._q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"Chromium did not answer in {timeout} s; log: {self.log.read_text()[-2000:]}")
        if msg is None:
            raise AssertionError(f"Chromium exited; log: {self.log.read_text()[-2000:]}")
        return msg

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._next(timeout)
            if m.get("id") == self._id:
                assert "error" not in m, (method, m["error"])
                return m["result"]
            self._events.append(m)

    def wait_event(self, name: str, session: str, timeout: float = 60) -> None:
        while not any(e.get("method") == name and e.get("sessionId") == session for e in self._events):
            self._events.append(self._next(timeout))

    def check(self, page: Path) -> tuple[list[str], list[dict]]:
        """Open ``page`` (file://) in a fresh tab: (problems, images). Problems are console errors, uncaught
        exceptions, failed loads, requests leaving file:/data:, and a failed navigation."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=s)
        self.call("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 900, "deviceScaleFactor": 1,
                                                          "mobile": False}, session=s)
        self._events.clear()
        nav = self.call("Page.navigate", {"url": page.resolve().as_uri()}, session=s)
        problems = [f"navigation: {nav['errorText']}"] if nav.get("errorText") else []
        self.wait_event("Page.loadEventFired", s)
        images = self.call("Runtime.evaluate", {"returnByValue": True, "expression": """
            Array.from(document.images, i => ({src: i.getAttribute('src').slice(0, 100), alt: i.alt,
              complete: i.complete, width: i.naturalWidth, shown: i.getBoundingClientRect().width > 0}))"""},
                           session=s)["result"]["value"]
        wide = self.call("Runtime.evaluate", {"returnByValue": True, "expression": """
            Array.from(document.querySelectorAll('body *')).filter(e => e.getBoundingClientRect().right >
              window.innerWidth + 1).map(e => e.tagName + '.' + e.className).slice(0, 5)
              .concat(document.documentElement.scrollWidth > window.innerWidth ? ['page scrolls sideways'] : [])"""},
                         session=s)["result"]["value"]
        problems += [f"wider than the 1280 px viewport: {w}" for w in wide]
        if self.screenshot_to is not None:
            shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=s)
            self.screenshot_to.write_bytes(base64.b64decode(shot["data"]))
            self.screenshot_to = None
        for e in (e for e in self._events if e.get("sessionId") == s):
            m, prm = e["method"], e.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = prm["exceptionDetails"]
                problems.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
            elif m == "Runtime.consoleAPICalled" and prm["type"] in ("error", "assert"):
                problems.append(f"console.{prm['type']}: {[a.get('value') for a in prm['args']]}")
            elif m == "Log.entryAdded" and prm["entry"]["level"] == "error":
                problems.append(f"log: {prm['entry']['text']} {prm['entry'].get('url', '')}")
            elif m == "Network.loadingFailed":
                problems.append(f"load failed: {prm['errorText']}")
            elif m == "Network.requestWillBeSent" and not prm["request"]["url"].startswith(("file:", "data:")):
                problems.append(f"external request: {prm['request']['url']}")
        self.call("Target.closeTarget", {"targetId": target})
        return problems, images

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except AssertionError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd)
        os.close(self._ans)


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium, or run .ci/install-chromium)")
    browser = Chromium(exe, tmp_path_factory.mktemp("chromium-profile"))
    yield browser
    browser.close()


def shown_cleanly(browser: Chromium, page: Path, n_images: int) -> None:
    problems, images = browser.check(page)
    assert problems == [], problems
    assert len(images) == n_images
    bad = [i for i in images if not (i["complete"] and i["width"] > 0 and i["shown"] and i["alt"])]
    assert bad == [], bad


@pytest.mark.browser
def test_chromium_shows_every_image_without_errors(chromium, run, tmp_path):
    run_dir, nb = run / "run", run / "elsewhere" / "nbrs"
    assert report(run_dir, "--include", nb).exit_code == 0
    shown_cleanly(chromium, run_dir / "report.html", 6)

    out = tmp_path / "site" / "r.html"  # relative paths from elsewhere on the disk
    assert report(run_dir, "--include", nb, "--out", out).exit_code == 0
    shown_cleanly(chromium, out, 6)

    one = tmp_path / "share.html"
    assert report(run_dir, "--include", nb, "--out", one, "--embed").exit_code == 0
    moved = tmp_path / "moved" / "copy.html"  # the embedded page alone, away from every image file
    moved.parent.mkdir()
    shutil.copy(one, moved)
    shown_cleanly(chromium, moved, 6)


@pytest.mark.browser
def test_chromium_check_catches_broken_pages(chromium, run, tmp_path):
    # The same check fails a page whose images are gone: the default page copied away from its run.
    assert report(run / "run").exit_code == 0
    orphan = tmp_path / "orphan.html"
    shutil.copy(run / "run" / "report.html", orphan)
    problems, images = chromium.check(orphan)
    assert len(images) == 4 and all(i["width"] == 0 for i in images)
    assert sum(p.startswith("load failed: net::ERR_FILE_NOT_FOUND") for p in problems) == 4, problems

    scripted = tmp_path / "scripted.html"
    scripted.write_text("<!DOCTYPE html><html><body><p>x</p><script>console.error('bad'); "
                        "null.f();</script></body></html>")
    problems, _ = chromium.check(scripted)
    assert any(p.startswith("console.error") for p in problems), problems
    assert any(p.startswith("exception: TypeError") for p in problems), problems


# ------------------------------------------------------------------------------- the answer first, side by side


def _card(text: str) -> dict[str, str]:
    """data-metric name -> the card's shown value and interval ("0.812 [0.79, 0.83]")."""
    import re

    card = text.split('<section class="card"', 1)[1].split("</section>", 1)[0]
    out = {}
    for name, body in re.findall(r'data-metric="(\w+)">(.*?)</div>', card):
        val = re.search(r'class="mval">([^<]*)<', body).group(1)
        ci = re.search(r'class="ci">\[([^<]*)\]<', body)
        out[name] = val + (f" [{ci.group(1)}]" if ci else "")
    return out


def test_summary_card_shows_the_numbers_of_metrics_json(run):
    from cskd_cache.inspect.run_summary import fmt3

    assert report(run / "run").exit_code == 0
    text = (run / "run" / "report.html").read_text()
    m = json.loads((run / "run" / "eval" / "test" / "metrics.json").read_text())
    card = _card(text)
    assert set(card) == {"srcc", "plcc", "acc"}, card
    for name in ("srcc", "plcc"):
        lo, hi = m[f"{name}_ci"]
        assert card[name] == f"{fmt3(m[name])} [{fmt3(lo)}, {fmt3(hi)}]"
    assert card["acc"].split(" ")[0] == fmt3(m["acc"])
    assert text.index('class="card"') < text.index("<nav>")  # the answer comes first
    p = Page(text)
    assert p.row("stage")[1] == "align" and p.row("model")[1] == "timm:test_resnet"
    end = [json.loads(x) for x in (run / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert end["type"] == "end" and p.row("wall time")[1] == f"{fmt3(end['seconds'])} s"


def _two_runs(run, tmp_path):
    """Two copies of the fixture's run, evaluated on the same 60 test images; b has another lr and better scores."""
    from cskd_cache.evaluate.metrics import srcc

    rng = np.random.default_rng(1)
    truth = rng.uniform(2, 8, 60)
    preds = {"a": truth + rng.normal(0, 2.0, 60), "b": truth + rng.normal(0, 0.5, 60)}
    for name in "ab":
        d = tmp_path / name
        shutil.copytree(run / "run", d, ignore=shutil.ignore_patterns("report.html", "checkpoints"))
        rows = "".join(f"k{i},/x/k{i}.png,{float(t)!r},{float(p)!r}\n" for i, (t, p) in enumerate(zip(truth, preds[name])))
        (d / "eval" / "test" / "predictions.csv").write_text("key,path,true,pred\n" + rows)
    cfg = (tmp_path / "b" / "config.yaml").read_text()
    (tmp_path / "b" / "config.yaml").write_text(cfg.replace("lr: 0.001", "lr: 0.002", 1))
    return tmp_path / "a", tmp_path / "b", srcc(truth, preds["b"]) - srcc(truth, preds["a"])


def test_comparison_page_shows_what_differs_and_the_paired_srcc_difference(run, tmp_path):
    from cskd_cache.inspect.run_summary import fmt3

    a, b, diff = _two_runs(run, tmp_path)
    out = tmp_path / "cmp" / "compare.html"
    r = report(a, b, "--out", out)
    assert r.exit_code == 0, r.output
    text = out.read_text()
    p = Page(text)
    assert p.row("lr")[1:] == ["0.001", "0.002"]  # only the setting that differs, one column per run
    assert [row[0] for row in p.rows if row and row[0] not in ("setting", "run", "SRCC difference")] == \
        ["a", "b", "lr", "b - a"]
    cell = p.row("b - a")[1]
    assert cell.startswith(fmt3(diff) + " [") and p.row("b - a")[2] == "60"
    lo, hi = (float(x) for x in cell.split("[")[1].rstrip("]").split(", "))
    assert lo < diff < hi and lo > 0  # b is better on the same images, beyond the paired interval
    # the runs' curves on shared axes, and their attention profiles (the fixture has attention.json) overlaid
    assert [i["src"] for i in p.imgs] == ["compare.curves.png", "compare.attention.png"]
    assert all((out.parent / i["src"]).read_bytes()[:8] == PNG for i in p.imgs)
    r = report(a, tmp_path / "nope", "--out", out)
    assert r.exit_code == 1 and "no config.yaml" in r.stderr


@pytest.mark.browser
def test_chromium_shows_the_run_page_and_the_comparison_page_within_the_viewport(chromium, run, tmp_path):
    run_dir, nb = run / "run", run / "elsewhere" / "nbrs"
    assert report(run_dir, "--include", nb).exit_code == 0
    shown_cleanly(chromium, run_dir / "report.html", 6)
    a, b, _ = _two_runs(run, tmp_path)
    assert report(a, b, "--out", tmp_path / "compare.html").exit_code == 0
    shown_cleanly(chromium, tmp_path / "compare.html", 2)
    wide = tmp_path / "wide.html"  # the check itself: a page wider than 1280 px fails it
    wide.write_text('<!DOCTYPE html><html><body><div style="width:2000px">x</div></body></html>')
    problems, _ = chromium.check(wide)
    assert any(p.startswith("wider than the 1280 px viewport") for p in problems), problems


def test_contact_sheets_fit_the_page_and_shorten_names_in_the_middle(tmp_path):
    from PIL import Image, ImageDraw

    from cskd_cache.inspect.contact_sheet import CAPTION_PX, MAX_WIDTH, Cell, _fit, _font, render_sheet

    photo(96, 64, 1).save(tmp_path / "a.png")
    cells = [Cell(str(tmp_path / "a.png"), f"set{i}/a-very-long-source-folder-name/img{i:04d}.png", ["cos=0.9"])
             for i in range(11)]  # a query and its 10 neighbours: wider than the page in one line
    render_sheet([cells], tmp_path / "sheet.png", thumb=128, title="query 1")
    with Image.open(tmp_path / "sheet.png") as im:
        assert im.width <= MAX_WIDTH and im.height > 2 * 128  # wrapped onto a second line of cells
    assert CAPTION_PX >= 12
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    short = _fit(draw, "set3/a-very-long-source-folder-name/img0003.png", _font(CAPTION_PX), 128)
    assert short.startswith("set3/") and short.endswith("0003.png") and "..." in short
