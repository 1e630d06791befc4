"""Read a sweep back: the trials table, and a Markdown/HTML report with plots (matplotlib)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from shortened.errors import ShortenedError
from shortened.io import write_text_atomic
from shortened.sweep.layout import ExperimentLayout
from shortened.sweep.selection import Choice, metric_value, pareto_front
from shortened.sweep.store import ResultsStore
from shortened.sweep.trial import DENSE


def open_experiment(ref: str, store_url: str | None = None, storage_path: str = "runs",
                    ) -> tuple[ResultsStore, str, Path | None]:
    """``ref`` is an experiment folder (with sweep.json) or a name under ``storage_path`` or in ``store_url``.
    Returns the store, the experiment's name and its folder (``ExperimentLayout(folder)`` has its paths)."""
    layout = ExperimentLayout(Path(ref).expanduser().resolve())
    if not layout.sweep_json.is_file():
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
    return store, ref, Path(exp["experiment_dir"])


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
    """(ratio, value) points per criterion/method line, sorted by ratio."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for t in trials:
        v = metric_value(t, metric)
        if t["key"] != DENSE and v is not None and t["status"] == "completed":
            lines.setdefault(f"{t['criterion']} / {t['method']}", []).append((t["ratio_actual"], v))
    return {k: sorted(v) for k, v in sorted(lines.items())}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, ylabel: str, title: str, out: Path) -> Path:
    """The axes every sweep plot shares (ratio on x), then write the PNG and free the figure."""
    ax.set_xlabel("pruning ratio (share of parameters removed)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return out


def plot_metric(trials: list[dict], metric: str, out: Path, title: str, log_y: bool = False) -> Path | None:
    plt = _pyplot()
    lines = _series(trials, metric)
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in lines.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    dense = next((t for t in trials if t["key"] == DENSE), None)
    base = metric_value(dense, metric) if dense else None
    if base is not None:
        ax.axhline(base, color="grey", linestyle="--", label="dense")
    if log_y:
        ax.set_yscale("log")
    return _save(fig, ax, metric, title, out)


def plot_pareto(trials: list[dict], choice: Choice, out: Path) -> Path | None:
    plt = _pyplot()
    from shortened.sweep.selection import lower_is_better

    metric = choice.metric
    pts = [(t["key"], t["ratio_actual"] or 0.0, metric_value(t, metric)) for t in trials
           if t["status"] == "completed" and metric_value(t, metric) is not None]
    if not pts:
        return None
    front = set(pareto_front(pts, lower_is_better(metric)))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p[1] for p in pts], [p[2] for p in pts], color="lightgrey", label="trials", zorder=2)
    fpts = sorted((p for p in pts if p[0] in front), key=lambda p: p[1])
    ax.plot([p[1] for p in fpts], [p[2] for p in fpts], marker="o", color="tab:blue", label="Pareto frontier",
            zorder=3)
    for k, r, v in pts:
        ax.annotate(k, (r, v), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if choice.chosen is not None:
        ax.scatter([choice.chosen["ratio_actual"]], [metric_value(choice.chosen, metric)], marker="*", s=250,
                   color="tab:red", label=f"selected ({choice.policy})", zorder=4)
    return _save(fig, ax, metric, "ratio vs " + metric, out)


def write_report(store: ResultsStore, name: str, out_dir: str | Path, choice: Choice, fmt: str = "md") -> Path:
    """Plots (PNG) and ``report.md`` or ``report.html`` in ``out_dir``; returns the report file."""
    if fmt not in ("md", "html"):
        raise ShortenedError(f"report format {fmt!r}: choose md or html")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = store.trials(name)
    exp = store.experiment(name)
    plots: list[tuple[str, Path]] = []
    for col in _metric_columns(trials):
        if col.startswith("ppl:"):
            p = plot_metric(trials, col, out_dir / f"{col.replace(':', '_')}.png", f"perplexity ({col[4:]}) vs ratio",
                            log_y=True)
        elif col == "zeroshot_mean":
            p = plot_metric(trials, col, out_dir / "zeroshot_mean.png", "zero-shot mean accuracy vs ratio")
        elif col.startswith("peak_memory_mb:"):
            p = plot_metric(trials, col, out_dir / f"peak_memory_{col.rsplit(':', 1)[1]}.png",
                            f"peak memory of the model alone, MiB ({col.rsplit(':', 1)[1]}) vs ratio")
        else:
            p = plot_metric(trials, col, out_dir / f"speedup_{col.rsplit(':', 1)[1]}.png",
                            f"generation speedup ({col.rsplit(':', 1)[1]}) vs ratio")
        if p:
            plots.append((col, p))
    p = plot_pareto(trials, choice, out_dir / "pareto.png")
    if p:
        plots.append(("pareto", p))
    headers, rows = trial_table(trials)
    chosen = choice.chosen
    summary = [f"Experiment **{name}** ({exp['status']}), {len(trials)} trials, store `{store.url}`.", "",
               f"Selection: policy `{choice.policy}` on `{choice.metric}`: "
               + (f"**{chosen['key']}** — {choice.reason}. Model: `{chosen['model_path']}`" if chosen
                  else f"nothing selected — {choice.reason}.")]
    if fmt == "md":
        text = [f"# Sweep report: {name}", "", *summary, "", "## Plots", ""]
        text += [f"![{c}]({p.name})" for c, p in plots]
        text += ["", "## Trials", "", markdown_table(headers, rows), ""]
        out = out_dir / "report.md"
        write_text_atomic(out, "\n".join(text))
    else:
        cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        body = (f"<h1>Sweep report: {html.escape(name)}</h1>"
                + "".join(f"<p>{html.escape(s.replace('**', '').replace('`', ''))}</p>" for s in summary if s)
                + "<h2>Plots</h2>" + "".join(f'<img src="{p.name}" alt="{html.escape(c)}">' for c, p in plots)
                + "<h2>Trials</h2><table border=1 cellpadding=3><tr>"
                + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + f"</tr>{cells}</table>")
        out = out_dir / "report.html"
        write_text_atomic(out, f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)}</title>"
                               f"</head><body>{body}</body></html>")
    return out
