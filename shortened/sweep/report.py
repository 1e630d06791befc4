"""Read a sweep back: the trials table, and a Markdown/HTML report with plots (matplotlib)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from shortened.errors import ShortenedError
from shortened.io import write_text_atomic
from shortened.sweep.layout import ExperimentLayout
from shortened.sweep.selection import Choice, metric_value, pareto_front
from shortened.sweep.store import ResultsStore
from shortened.sweep.trial import DENSE, patch_of_key


def open_experiment(ref: str, store_url: str | None = None, storage_path: str = "runs",
                    ) -> tuple[ResultsStore, str, Path | None]:
    """``ref`` is an experiment folder (with sweep.json) or a name under ``storage_path`` or in ``store_url``.
    Returns the store, the experiment's name and its folder (``ExperimentLayout(folder)`` has its paths)."""
    from shortened import storage

    layout = ExperimentLayout(storage.path(storage.absolute(ref)))  # a folder, or one in an object store
    if not layout.sweep_json.is_file() and not storage.is_url(ref):
        layout = ExperimentLayout.of(storage_path, ref)
    if layout.sweep_json.is_file():
        saved = json.loads(layout.sweep_json.read_text())
        return ResultsStore(store_url or saved.get("store_url") or layout.store_url), saved["name"], layout.root
    if store_url is None:
        raise ShortenedError(f"experiment {ref!r}: no {layout.sweep_json.name} at {ref} or {layout.root}; pass the "
                             "experiment folder, or --store_url URL with the experiment's name")
    from sqlalchemy.engine import make_url

    url = make_url(store_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
            and not Path(url.database).expanduser().is_file():
        raise ShortenedError(f"--store {url.render_as_string(hide_password=True)}: no such results database "
                             f"{url.database!r} (reading verbs never create one)")
    store = ResultsStore(store_url)
    exp = store.experiment(ref)
    return store, ref, storage.path(exp["experiment_dir"])


def _metric_columns(trials: list[dict]) -> list[str]:
    """``NAME:DATASET`` columns worth a table column: perplexities, the zero-shot mean, batch-1 speedups and batch-1
    peak memory of each model alone (``peak_memory_mb``: its weights plus its generation's working memory, MiB)."""
    cols: dict[str, None] = {}
    for t in trials:
        for m in t["metrics"]:
            if m["name"] == "ppl":
                cols[f"ppl:{m['dataset']}"] = None
    if any(m["name"] == "zeroshot_mean" for t in trials for m in t["metrics"]):
        cols["zeroshot_mean"] = None
    for t in trials:
        for m in t["metrics"]:
            if m["name"] == "speedup_vs_baseline" and m["dataset"].startswith("gen-b1-"):
                cols[f"speedup_vs_baseline:{m['dataset']}"] = None
    for t in trials:
        for m in t["metrics"]:
            if m["name"] == "peak_memory_mb" and m["dataset"].startswith("gen-b1-"):
                cols[f"peak_memory_mb:{m['dataset']}"] = None
    return list(cols)


def trial_table(trials: list[dict]) -> tuple[list[str], list[list[str]]]:
    cols = _metric_columns(trials)
    headers = ["trial", "status", "criterion", "method", "ratio", "actual", "blocks", "params (M)", "tokens",
               *[c.replace("speedup_vs_baseline:gen-", "speedup ").replace("peak_memory_mb:gen-", "peak MiB ")
                 for c in cols], "minutes"]

    def f(v, fmt="{:.3f}") -> str:
        return "" if v is None else fmt.format(v)

    rows = []
    order = sorted(trials, key=lambda t: (t["key"] != DENSE, t["criterion"] or "", t["ratio_actual"] or 0.0,
                                          t["blocks_requested"] or 0, t["method"]))
    for t in order:
        rows.append([t["key"], t["status"], t["criterion"] or "", t["method"], f(t["ratio"], "{:g}"),
                     f(t["ratio_actual"]), f(t["num_blocks"], "{}"), f(t["params"] and t["params"] / 1e6, "{:.1f}"),
                     f(t["tokens_trained"], "{:,}"), *[f(metric_value(t, c), "{:.4g}") for c in cols],
                     f(t["total_s"] and t["total_s"] / 60, "{:.1f}")])
    return headers, rows


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _series(trials: list[dict], metric: str) -> dict[str, list[tuple[float, float]]]:
    """(ratio, value) points per criterion/method line (a seam-patched trial on its own line, ``ppl+linear /
    cpt``), sorted by ratio."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for t in trials:
        v = metric_value(t, metric)
        if t["key"] != DENSE and v is not None and t["status"] == "completed":
            patch = patch_of_key(t["key"])
            criterion = t["criterion"] if patch == "none" else f"{t['criterion']}+{patch}"
            lines.setdefault(f"{criterion} / {t['method']}", []).append((t["ratio_actual"], v))
    return {k: sorted(v) for k, v in sorted(lines.items())}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


DATASET_NAMES = {"wikitext2": "WikiText-2", "ptb": "PTB", "ptb_valid": "PTB (validation)", "c4": "C4"}


def _speed_setting(dataset: str) -> str:
    """``gen-b1-n32`` → ``batch 1, 32 new tokens``."""
    m = re.fullmatch(r"gen-b(\d+)-n(\d+)", dataset)
    return f"batch {m.group(1)}, {m.group(2)} new tokens" if m else dataset


def metric_axis(metric: str) -> tuple[str, bool]:
    """The axis label of a ``NAME[:DATASET]`` metric, with its unit, and whether it reads best on a log scale
    (perplexity: its values span decades, 60 to 6·10⁵ on the demo)."""
    name, _, dataset = metric.partition(":")
    if name == "ppl":
        return f"perplexity on {DATASET_NAMES.get(dataset, dataset)} (lower is better, log scale)", True
    if name == "zeroshot_mean":
        return "mean zero-shot accuracy (fraction correct)", False
    if name in ("acc", "acc_norm"):
        return f"{name} on {dataset} (fraction correct)", False
    if name == "speedup_vs_baseline":
        return f"speedup over the dense model (×; {_speed_setting(dataset)})", False
    if name in ("peak_memory_mb", "model_memory_mb", "generation_peak_mb"):
        return f"{name.replace('_mb', '').replace('_', ' ')} of the model alone (MiB; {_speed_setting(dataset)})", False
    if name == "latency_s":
        return f"latency (s; {_speed_setting(dataset)})", False
    if name == "tokens_per_s":
        return f"throughput (tokens/s; {_speed_setting(dataset)})", False
    return metric, False


def _log_axis(axis) -> None:
    """A log axis labelled at 1, 2 and 5 × 10ⁿ in plain numbers, no minor labels (they collide on short ranges)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _texts(fig) -> list:
    """Every text of ``fig`` that is drawn: titles, axis labels, the tick labels inside the axes' view, legend
    entries and point labels."""
    texts = []
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if lo <= tick.get_loc() <= hi:
                    texts += [tick.label1, tick.label2]
        legend = ax.get_legend()
        if legend is not None:
            texts += legend.get_texts()
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def _boxes(fig, renderer, exclude=()) -> list:
    """(name, drawn box) of every text of ``fig`` outside its legends, and of each legend's frame."""
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    inside_legends = {id(t) for legend in legends for t in legend.get_texts()}
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in _texts(fig)
             if t not in exclude and id(t) not in inside_legends]
    return boxes + [("legend", legend.get_window_extent(renderer)) for legend in legends]


def label_overlaps(fig) -> list[tuple[str, str]]:
    """Pairs of texts of ``fig`` (legend frames included) whose drawn boxes overlap, and point labels that stick
    out of their axes: empty when every label is readable."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = _boxes(fig, renderer)
    pairs = [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:] if ba.overlaps(bb)]
    for ax in fig.axes:
        frame = ax.get_window_extent(renderer)
        pairs += [(t.get_text(), "axes edge") for t in ax.texts
                  if not _inside(t.get_window_extent(renderer), frame)]
    return pairs


def _inside(box, frame) -> bool:
    return box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1


def _declutter(fig, annotations: list, step_pt: float = 7.0, tries: int = 12) -> None:
    """Place point labels (annotations in offset points) where they overlap no other text or legend and stay
    inside their axes: right of the point, then left of it, each moved up or down, alternately further."""
    if not annotations:
        return
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed = [b for _, b in _boxes(fig, renderer, exclude=annotations)]
    for ann in annotations:
        frame = ann.axes.get_window_extent(renderer)
        x0, y0 = ann.xyann
        for side, ha in ((abs(x0), "left"), (-abs(x0), "right")):
            ann.set_ha(ha)
            for i in range(tries):
                shift = 0.0 if i == 0 else step_pt * ((i + 1) // 2) * (1 if i % 2 else -1)
                ann.xyann = (side, y0 + shift)
                box = ann.get_window_extent(renderer)
                if _inside(box, frame) and not any(box.overlaps(p) for p in placed):
                    break
            else:
                continue
            break
        placed.append(ann.get_window_extent(renderer))


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, annotations: list | None = None):
    """Labels, grid, the legend outside the axes (it never covers points or their labels), a tidy layout and
    decluttered point labels. Returns ``fig``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    _declutter(fig, annotations or [])
    return fig


def _save(fig, out: Path) -> Path:
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return out


RATIO_AXIS = "parameters removed (%)"


def _percent_x(ax) -> None:
    from matplotlib.ticker import PercentFormatter

    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))


def metric_figure(trials: list[dict], metric: str, title: str):
    """``metric`` against the share of parameters removed, one line per criterion / method, the dense model as a
    dashed line; perplexity on a log axis. None when no trial has the metric."""
    lines = _series(trials, metric)
    if not lines:
        return None
    ylabel, log_y = metric_axis(metric)
    fig, ax = _pyplot().subplots(figsize=(7.5, 4.2))
    for label, pts in lines.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    dense = next((t for t in trials if t["key"] == DENSE), None)
    base = metric_value(dense, metric) if dense else None
    if base is not None:
        ax.axhline(base, color="grey", linestyle="--", label="dense")
    if log_y:
        ax.set_yscale("log")
        _log_axis(ax.yaxis)
    _percent_x(ax)
    return _finish(fig, ax, RATIO_AXIS, ylabel, title)


def plot_metric(trials: list[dict], metric: str, out: Path, title: str) -> Path | None:
    fig = metric_figure(trials, metric, title)
    return _save(fig, out) if fig is not None else None


def pareto_figure(trials: list[dict], choice: Choice):
    """The selection metric against the share of parameters removed: every trial, the Pareto frontier and the
    selected trial. None when no trial has the metric."""
    from shortened.sweep.selection import lower_is_better

    metric = choice.metric
    pts = [(t["key"], t["ratio_actual"] or 0.0, metric_value(t, metric)) for t in trials
           if t["status"] == "completed" and metric_value(t, metric) is not None]
    if not pts:
        return None
    ylabel, log_y = metric_axis(metric)
    front = set(pareto_front(pts, lower_is_better(metric)))
    fig, ax = _pyplot().subplots(figsize=(7.5, 4.2))
    ax.scatter([p[1] for p in pts], [p[2] for p in pts], color="lightgrey", label="trials", zorder=2)
    chosen = None if choice.chosen is None else (choice.chosen["ratio_actual"], metric_value(choice.chosen, metric))
    labels = _frontier_and_selection(ax, pts, front, chosen, choice.policy, log_y, marker="o", color="tab:blue",
                                     label="Pareto frontier", zorder=3)
    _percent_x(ax)
    ax.margins(x=0.12, y=0.15)
    return _finish(fig, ax, RATIO_AXIS, ylabel, f"{ylabel.split(' (')[0]} vs parameters removed", labels)


def _frontier_and_selection(ax, pts: list[tuple[str, float, float]], front: set[str],
                            chosen: tuple[float, float] | None, policy: str, log_y: bool, **frontier_style) -> list:
    """On ``ax`` (whose trials ``pts`` = (key, x, y) are drawn): the frontier through the keys in ``front``, the
    selected trial's point ``chosen`` as a red star, a log y axis if ``log_y``; returns each point's key label."""
    fpts = sorted((p for p in pts if p[0] in front), key=lambda p: p[1])
    ax.plot([p[1] for p in fpts], [p[2] for p in fpts], **frontier_style)
    if chosen is not None:
        ax.scatter([chosen[0]], [chosen[1]], marker="*", s=250, color="tab:red", label=f"selected ({policy})",
                   zorder=4)
    if log_y:
        ax.set_yscale("log")
        _log_axis(ax.yaxis)
    return [ax.annotate(k, (x, y), fontsize=7, xytext=(5, 3), textcoords="offset points") for k, x, y in pts]


def plot_pareto(trials: list[dict], choice: Choice, out: Path) -> Path | None:
    fig = pareto_figure(trials, choice)
    return _save(fig, out) if fig is not None else None


def _speedup_column(trials: list[dict]) -> str | None:
    """The measured batch-1 speedup metric (``speedup_vs_baseline:gen-b1-nN``, the largest N), if any."""
    cols = [c for c in _metric_columns(trials) if c.startswith("speedup_vs_baseline:gen-b1-")]
    return max(cols, key=lambda c: int(c.rsplit("-n", 1)[1]), default=None)


def tradeoff_figure(trials: list[dict], choice: Choice):
    """The trade-off a user picks from: the selection metric against the measured generation speedup over the
    dense model (batch 1), one point per trial (the dense model at 1×), its speed–quality frontier and the selected
    trial. None without speed measurements."""
    from shortened.sweep.selection import lower_is_better

    speed, metric = _speedup_column(trials), choice.metric
    if speed is None:
        return None
    pts = [(t["key"], metric_value(t, speed), metric_value(t, metric)) for t in trials if t["status"] == "completed"]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    if not pts:
        return None
    ylabel, log_y = metric_axis(metric)
    xlabel, _ = metric_axis(speed)
    front = set(pareto_front(pts, lower_is_better(metric)))  # faster and better: nothing both faster and better
    fig, ax = _pyplot().subplots(figsize=(7.5, 4.2))
    methods = sorted({t["method"] for t in trials if t["key"] in {p[0] for p in pts}})
    by_key = {t["key"]: t for t in trials}
    for i, method in enumerate(methods):
        mine = [p for p in pts if by_key[p[0]]["method"] == method]
        ax.scatter([p[1] for p in mine], [p[2] for p in mine], color=f"C{i}", label=method, zorder=3)
    chosen = next((p[1:] for p in pts if choice.chosen is not None and p[0] == choice.chosen["key"]), None)
    labels = _frontier_and_selection(ax, pts, front, chosen, choice.policy, log_y, color="grey", linestyle=":",
                                     label="frontier", zorder=2)
    ax.margins(x=0.15, y=0.15)
    return _finish(fig, ax, xlabel, ylabel, f"{ylabel.split(' (')[0]} vs measured speedup", labels)


def plot_tradeoff(trials: list[dict], choice: Choice, out: Path) -> Path | None:
    fig = tradeoff_figure(trials, choice)
    return _save(fig, out) if fig is not None else None


def _plots(trials: list[dict], choice: Choice, out_dir: Path) -> list[tuple[str, str, Path]]:
    """Every plot of the report: (column, caption, PNG)."""
    plots: list[tuple[str, str, Path]] = []
    p = plot_tradeoff(trials, choice, out_dir / "tradeoff.png")
    if p:
        plots.append(("tradeoff", f"{metric_axis(choice.metric)[0].split(' (')[0]} against the measured generation "
                                  "speedup: the trade-off to pick from", p))
    for col in _metric_columns(trials):
        setting = _speed_setting(col.rsplit(":", 1)[1]) if ":gen-" in col else ""
        if col.startswith("ppl:"):
            caption = f"perplexity on {DATASET_NAMES.get(col[4:], col[4:])} vs parameters removed"
            p = plot_metric(trials, col, out_dir / f"{col.replace(':', '_')}.png", caption)
        elif col == "zeroshot_mean":
            caption = "mean zero-shot accuracy vs parameters removed"
            p = plot_metric(trials, col, out_dir / "zeroshot_mean.png", caption)
        elif col.startswith("peak_memory_mb:"):
            caption = f"peak memory of the model alone ({setting}) vs parameters removed"
            p = plot_metric(trials, col, out_dir / f"peak_memory_{col.rsplit(':', 1)[1]}.png", caption)
        else:
            caption = f"generation speedup ({setting}) vs parameters removed"
            p = plot_metric(trials, col, out_dir / f"speedup_{col.rsplit(':', 1)[1]}.png", caption)
        if p:
            plots.append((col, caption, p))
    p = plot_pareto(trials, choice, out_dir / "pareto.png")
    if p:
        plots.append(("pareto", f"{choice.metric} vs parameters removed: the Pareto frontier and the selection", p))
    return plots


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
code { background: #f3f3f3; padding: 0 3px; }
"""


def _html(name: str, summary: list[str], plots: list[tuple[str, str, Path]], headers: list[str],
          rows: list[list[str]]) -> str:
    """A self-contained page: summary, plots (each with its size and a caption) and the trials table."""
    from PIL import Image

    def inline(s: str) -> str:  # the summary's Markdown bold and code
        s = html.escape(s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", s)

    figures = []
    for col, caption, p in plots:
        with Image.open(p) as im:
            w, h = im.size
        figures.append(f'<figure><img src="{html.escape(p.name)}" width="{w}" height="{h}" '
                       f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>')
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<link rel=\"icon\" href=\"data:,\"><title>Sweep report: {html.escape(name)}</title>"
            f"<style>{HTML_STYLE}</style></head>\n<body><h1>Sweep report: {html.escape(name)}</h1>\n"
            + "".join(f"<p>{inline(s)}</p>" for s in summary if s)
            + "\n<h2>Plots</h2>\n" + "\n".join(figures)
            + f"\n<h2>Trials</h2>\n<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>\n"
            "</body></html>\n")


def write_report(store: ResultsStore, name: str, out_dir: str | Path, choice: Choice, fmt: str = "md") -> Path:
    """Plots (PNG) and ``report.md`` or ``report.html`` in ``out_dir``; returns the report file. The plots: the
    selection metric against the measured speedup (the trade-off; when the sweep measured speed), each metric
    against the share of parameters removed (perplexity on a log axis), and the Pareto frontier of the selection
    metric; every axis says its unit."""
    if fmt not in ("md", "html"):
        raise ShortenedError(f"report format {fmt!r}: choose md or html")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = store.trials(name)
    exp = store.experiment(name)
    plots = _plots(trials, choice, out_dir)
    headers, rows = trial_table(trials)
    chosen = choice.chosen
    summary = [f"Experiment **{name}** ({exp['status']}), {len(trials)} trials, store `{store.url}`.", "",
               f"Selection: policy `{choice.policy}` on `{choice.metric}`: "
               + (f"**{chosen['key']}** — {choice.reason}. Model: `{chosen['model_path']}`" if chosen
                  else f"nothing selected — {choice.reason}.")]
    if fmt == "md":
        text = [f"# Sweep report: {name}", "", *summary, "", "## Plots", ""]
        text += [f"![{caption}]({p.name})" for _, caption, p in plots]
        text += ["", "## Trials", "", markdown_table(headers, rows), ""]
        out = out_dir / "report.md"
        write_text_atomic(out, "\n".join(text))
    else:
        out = out_dir / "report.html"
        write_text_atomic(out, _html(name, summary, plots, headers, rows))
    return out
