"""The sweep report as people look at it: `shortened report --format html` opened in a real headless Chromium
(Debian's `chromium`, driven over the Chrome DevTools Protocol): no console errors, every image loads, the page is
not blank; and the plots themselves: perplexity on a log axis, units on every axis, no overlapping labels, and the
quality-against-speedup trade-off plot."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from shortened.cli import main
from shortened.sweep import SweepConfig
from shortened.sweep.report import label_overlaps, metric_figure, pareto_figure, tradeoff_figure
from shortened.sweep.runner import register_experiment
from shortened.sweep.selection import select
from shortened.sweep.store import ResultsStore
from shortened.sweep.trial import TrialResult, TrialSpec, TrialTimings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# (method, ratio, blocks kept, WikiText-2 PPL, zero-shot mean, batch-1 speedup): the demo's shape, with perplexities
# spanning 60 to 6·10⁵ as real sweeps do once too much is removed
TRIALS = [("dense", None, 30, 61.44, 0.600, 1.0), ("cpt", 0.2, 23, 115.5, 0.488, 1.197),
          ("lora", 0.2, 23, 127.4, 0.488, 1.197), ("cpt", 0.35, 17, 414.7, 0.450, 1.446),
          ("lora", 0.35, 17, 491.4, 0.463, 1.446), ("lora", 0.6, 10, 6.1e5, 0.260, 2.31)]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """An experiment folder as a sweep leaves it (sweep.json, the SQLite store with trials and metrics), written
    through the sweep's own store code."""
    root = tmp_path_factory.mktemp("report")
    cfg = SweepConfig.model_validate(dict(name="demo", model=str(root), criteria=["ppl"], ratios=[0.2, 0.35, 0.6],
                                          methods=["lora", "cpt"], storage_path=str(root), train={"train_tokens": 4096},
                                          eval={"ppl": ["wikitext2"], "tasks": ["piqa", "arc_easy"], "speed": True},
                                          selection={"tolerance_pct": 150}))
    store = ResultsStore(cfg.resolved_store_url())
    register_experiment(cfg, store, resume=False)
    for method, ratio, blocks, ppl, zs, speedup in TRIALS:
        spec = TrialSpec(method=method) if method == "dense" else TrialSpec(method=method, criterion="ppl",
                                                                            ratio=ratio)
        params = int(134.5e6 * blocks / 30)
        store.record_result(cfg.name, TrialResult(
            key=spec.key, spec=spec, model_path=str(root / spec.key), num_blocks=blocks,
            removed_blocks=list(range(30 - blocks)), blocks_requested=None if ratio is None else 30 - blocks,
            params=params, params_before=134_500_000, ratio_actual=1 - params / 134.5e6,
            tokens_trained=0 if method == "dense" else 4096, timings=TrialTimings(total_s=120.0),
            metrics=[{"name": "ppl", "dataset": "wikitext2", "value": ppl, "protocol": "paper"},
                     {"name": "zeroshot_mean", "dataset": "piqa,arc_easy", "value": zs, "protocol": "lm-eval"}]))
        store.upsert_trial(cfg.name, spec.key, {"method": method}, [
            {"name": "speedup_vs_baseline", "dataset": "gen-b1-n32", "value": speedup, "protocol": "speed"},
            {"name": "peak_memory_mb", "dataset": "gen-b1-n32", "value": params * 4 / 2**20 + 20, "protocol": "speed"}])
    store.set_experiment(cfg.name, status="completed")
    return cfg.layout.root


def test_plots_have_units_a_log_perplexity_axis_and_no_overlapping_labels(experiment):
    store = ResultsStore(f"sqlite:///{experiment / 'results.db'}")
    trials = store.trials("demo")
    choice = select(trials, SweepConfig.model_validate_json((experiment / "sweep.json").read_text()).selection)
    ppl = metric_figure(trials, "ppl:wikitext2", "perplexity vs parameters removed")
    ax = ppl.axes[0]
    assert ax.get_yscale() == "log" and "log scale" in ax.get_ylabel()
    assert ax.get_xlabel() == "parameters removed (%)"
    lo, hi = ax.get_ylim()
    assert lo <= 61.44 and hi >= 6.1e5  # every point on the axis, 4 decades apart
    trade = tradeoff_figure(trials, choice)
    tax = trade.axes[0]
    assert "speedup over the dense model (×; batch 1, 32 new tokens)" == tax.get_xlabel()
    assert tax.get_yscale() == "log" and "perplexity on WikiText-2" in tax.get_ylabel()
    assert {t.get_text() for t in tax.texts} == {"dense", "ppl-r0.2-cpt", "ppl-r0.2-lora", "ppl-r0.35-cpt",
                                                 "ppl-r0.35-lora", "ppl-r0.6-lora"}
    memory = metric_figure(trials, "peak_memory_mb:gen-b1-n32", "memory")
    assert "(MiB;" in memory.axes[0].get_ylabel()
    accuracy = metric_figure(trials, "zeroshot_mean", "zero-shot")
    assert "fraction correct" in accuracy.axes[0].get_ylabel() and accuracy.axes[0].get_yscale() == "linear"
    # the selected trial's red star sits on its point in both trade-off plots
    pareto = pareto_figure(trials, choice)
    chosen = choice.chosen
    for fig, xy in ((trade, (1.197, 115.5)), (pareto, (chosen["ratio_actual"], 115.5))):
        [star] = [c for c in fig.axes[0].collections if c.get_label().startswith("selected")]
        assert chosen["key"] == "ppl-r0.2-cpt" and tuple(star.get_offsets()[0]) == pytest.approx(xy)
    # trials at the same ratio or speedup (lora and cpt) have labels on top of each other until decluttered
    for fig in (ppl, trade, pareto, memory, accuracy):
        assert label_overlaps(fig) == []


class DevTools:
    """A minimal Chrome DevTools Protocol client over the page target's websocket: send commands, collect events."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)  # (Chromium refuses origins)
        self.next_id, self.events = 0, []

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event: str, timeout: float = 30.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for e in self.events:
                if e.get("method") == event:
                    return e
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(event)


@pytest.fixture
def chromium(tmp_path):
    """Headless Chromium with a fresh profile; yields a DevTools client attached to its page."""
    import urllib.request

    if CHROMIUM is None:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install -y chromium)")
    profile = tmp_path / "profile"
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                             "--disable-component-update", "--disable-sync", "--no-first-run",
                             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,2000",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        client = DevTools(page["webSocketDebuggerUrl"])
        yield client
        client.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_html_report_loads_in_a_real_browser(experiment, chromium, tmp_path):
    from PIL import Image, ImageStat

    out = tmp_path / "report"
    assert main(["report", str(experiment), "--format", "html", "--out", str(out)]) == 0
    page = out / "report.html"
    for method in ("Runtime.enable", "Log.enable", "Page.enable"):
        chromium.send(method)
    chromium.send("Page.navigate", url=page.as_uri())
    chromium.wait_for("Page.loadEventFired")
    images = chromium.send("Runtime.evaluate", returnByValue=True, expression=(
        "Array.from(document.images).map(i => ({src: i.getAttribute('src'), complete: i.complete, "
        "width: i.naturalWidth, height: i.naturalHeight}))"))["result"]["value"]
    names = {i["src"] for i in images}
    assert {"tradeoff.png", "ppl_wikitext2.png", "zeroshot_mean.png", "pareto.png"} <= names
    assert all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in images), images
    errors = [e for e in chromium.events
              if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert errors == []
    title = chromium.send("Runtime.evaluate", expression="document.title", returnByValue=True)["result"]["value"]
    assert title == "Sweep report: demo"
    shot = Image.open(io.BytesIO(base64.b64decode(chromium.send("Page.captureScreenshot", format="png")["data"])))
    gray = shot.convert("L")
    assert gray.size[0] >= 800 and ImageStat.Stat(gray).stddev[0] > 10  # text and plots, not a blank page
    assert len(gray.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50
