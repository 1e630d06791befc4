"""What a person sees while ``shortened`` runs: results on stdout, logs on stderr, libraries' noise silenced, and the
sweep's live view.

* **stdout is for results.** :func:`results_on_stdout` points ``sys.stdout`` (and every logging handler bound to it,
  such as DeepSpeed's, which logs "Setting accelerator to CPU" on stdout at import) at stderr while a verb runs;
  :func:`result` writes to the real stdout. So ``shortened score … | jq`` reads the JSON alone.
* **Libraries are quiet unless ``--verbose``.** In Ray workers (:func:`ray_runtime_env`: environment variables and a
  ``worker_process_setup_hook``), Hugging Face, GGUF, datasets, shard-writing and lm-eval progress bars are off and
  known harmless messages are dropped, while real warnings and errors still reach the driver. Worker lines that are
  pure bookkeeping (Ray Train's worker-group and checkpoint reports, a C++ note about an actor's constructor
  arguments) are skipped on the driver with Ray's own ``RAY_DEDUP_LOGS_SKIP_REGEX``. ``--quiet`` does the same in
  the command's own process (:func:`quiet_libraries`), and lm-eval no longer runs ``git describe`` (which printed
  "fatal: not a git repository" outside a git folder).
* **The sweep's live view** (:class:`SweepConsole`): one line per trial — state, phase (prune, train, eval), tokens
  trained / budget, last metric (training loss, then the selection metric), elapsed, ETA — and the totals; redrawn in
  place with ``rich`` on a terminal, plain lines (one per state or phase change) otherwise (CI, ``ray job logs``).
  Training progress comes from the files rank 0 writes at every report (:func:`write_training_progress`) into the
  experiment's ``progress/`` folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

VERBOSE_ENV = "SHORTENED_VERBOSE"  # "1" in workers when the driver runs with --verbose
PROGRESS_ENV = "SHORTENED_PROGRESS_DIR"  # where Train workers' rank 0 writes its progress (one JSON per run)
WORKER_LOG_LEVEL_ENV = "SHORTENED_WORKER_LOG_LEVEL"  # the level of shortened's own logs in workers

# Environment of every Ray worker unless --verbose: the libraries' own switches for their progress bars and advice
# (their warnings stay on: the known harmless ones are dropped by message, HARMLESS_WARNINGS)
QUIET_WORKER_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # hub downloads, and transformers' loading / GGUF / shard-writing bars
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",  # every other tqdm bar (lm-eval's requests, contexts, tokenizing)
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",  # transformers' advice (logger.warning_advice), never a problem
    "TOKENIZERS_PARALLELISM": "false",  # the fork warning of HF tokenizers
}
# --quiet: the command's own libraries log errors only
QUIET_LOG_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error", "LMEVAL_LOG_LEVEL": "ERROR"}

# Messages of libraries that are known to say nothing a user must act on (matched at the start of the message)
HARMLESS_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",  # lm-eval: we pass the model in memory on purpose
    "Passed an already-initialized model through `pretrained`",
    "Setting accelerator to CPU",  # DeepSpeed on a CPU-only machine (the CPU is what was asked for)
    "Custom kwargs can be passed to `--metadata`",
    "For example --metadata=",
    "Token authentication is enabled for this Ray cluster",
    "Removed the following hyperparameter values when logging to tensorboard",
    # deprecations inside DeepSpeed/peft's own calls (nothing in this project or the user's config to change)
    "`is_gradient_checkpointing` is deprecated",
    "`torch.distributed.all_gather_into_tensor` is deprecated",
    # Ray Train's controller, when a 2-core machine is busy: a resource-request RPC timed out and is retried (Ray:
    # "it's safe to ignore this error" when transient); -v shows them
    "Failed to send resource request for",
    "Failed to get reserved resources for",
)
# Ray Train's controller configures the "ray.train" logger itself (dictConfig replaces its handlers), so the filter
# sits on the loggers that emit those two messages
_RAY_TRAIN_SCALING_LOGGERS = ("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
                              "ray.train.v2._internal.execution.scaling_policy.elastic")

# Lines of Ray workers, forwarded to the driver, that are bookkeeping rather than news (a regex for Ray's
# RAY_DEDUP_LOGS_SKIP_REGEX; real errors from the same actors still show)
HARMLESS_WORKER_LINES = (
    r"Requesting resources: \{",
    r"Attempting to start training worker group",
    r"Started training worker group of size",
    r"^- \(ip=.*world_rank=",
    r"Setting up process group for: ",
    r"Reporting training result \d+: ",
    r"Checkpoint successfully created at: ",
    r"has constructor arguments in the object store and max_restarts > 0",  # a C++ note from Ray Train's controller
    r"Setting accelerator to CPU",
    r"`pretrained` model kwarg is not of type `str`",
    r"Passed an already-initialized model through `pretrained`",
    r"Custom kwargs can be passed to `--metadata`",
    r"For example --metadata=",
)


@dataclass
class Settings:
    """How chatty this process is: ``verbose`` (``-v``: INFO logs, and workers keep their bars and warnings) and
    ``quiet`` (``--quiet``: no progress bars in this process either)."""

    verbose: bool = False
    quiet: bool = False


settings = Settings()


def configure(verbose: bool = False, quiet: bool = False) -> None:
    """Set this process's console: logging to stderr (INFO with ``verbose``, else WARNING), the Ray log filter for
    what workers forward, and with ``quiet`` no library progress bars or known harmless warnings here."""
    settings.verbose, settings.quiet = verbose, quiet
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not verbose:
        skip_harmless_worker_lines()
        _filter_harmless_logs()
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy reporter is silent at verbose=0
    if quiet and not verbose:
        quiet_libraries(warnings_too=True)


# -- what Ray workers get -----------------------------------------------------------------------------------------

def worker_env(verbose: bool | None = None) -> dict[str, str]:
    """Environment variables for every Ray worker: the libraries' quiet switches unless ``verbose`` (default: this
    process's setting), and :data:`VERBOSE_ENV` so :func:`worker_setup` knows."""
    verbose = settings.verbose if verbose is None else verbose
    return {VERBOSE_ENV: "1"} if verbose else {**QUIET_WORKER_ENV, VERBOSE_ENV: "0"}


def ray_runtime_env(verbose: bool | None = None) -> dict[str, Any]:
    """The ``runtime_env`` for ``ray.init``: :func:`worker_env` and :func:`worker_setup` as every worker's setup hook
    (Ray merges it with a submitted job's own runtime env)."""
    return {"env_vars": worker_env(verbose), "worker_process_setup_hook": "shortened.console.worker_setup"}


def worker_setup() -> None:
    """Run by Ray in every worker process before its first task (``worker_process_setup_hook``): unless the driver
    is verbose, library progress bars off and known harmless warnings dropped; real warnings and errors stay."""
    if os.environ.get(VERBOSE_ENV) == "1":
        return
    quiet_libraries()
    level = os.environ.get(WORKER_LOG_LEVEL_ENV)
    if level:  # a sweep's Train workers: their step lines are in the live view already
        logging.getLogger("shortened").setLevel(level)


def quiet_libraries(warnings_too: bool = False) -> None:
    """In this process: Hugging Face (hub, transformers incl. GGUF loading and shard writing, datasets) and tqdm
    progress bars off, known harmless warnings dropped, lm-eval's ``git describe`` call skipped; with
    ``warnings_too`` (``--quiet``) transformers, datasets, lm-eval and DeepSpeed log errors only. Libraries not
    imported yet are set through their environment variables, so importing them later is quiet too."""
    os.environ.update({k: v for k, v in QUIET_WORKER_ENV.items() if k != "TOKENIZERS_PARALLELISM"})
    if warnings_too:
        os.environ.update(QUIET_LOG_ENV)
        for name in ("transformers", "datasets", "lm_eval", "DeepSpeed", "accelerate", "peft", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)
    _tqdm_off()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        if warnings_too:
            transformers.utils.logging.set_verbosity_error()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
        if warnings_too:
            datasets.utils.logging.set_verbosity_error()
    for text in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(text))
    _filter_harmless_logs()
    skip_git_probe()


def _tqdm_off() -> None:
    """Every tqdm bar of this process disabled. ``TQDM_DISABLE`` only sets the default, which callers that pass
    ``disable=`` themselves override (lm-eval passes ``disable=False`` on rank 0), so the constructor is wrapped to
    force ``disable=True``."""
    import functools

    import tqdm.std

    init = tqdm.std.tqdm.__init__
    if getattr(init, "_shortened_quiet", False):
        return

    @functools.wraps(init)
    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    quiet_init._shortened_quiet = True  # type: ignore[attr-defined]
    tqdm.std.tqdm.__init__ = quiet_init  # type: ignore[method-assign]


class _HarmlessFilter(logging.Filter):
    """Drops log records whose message starts with one of :data:`HARMLESS_WARNINGS`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to drop
            return True
        return not any(text in msg for text in HARMLESS_WARNINGS)


_HARMLESS = _HarmlessFilter()


def _filter_harmless_logs() -> None:
    """Attach the harmless-message filter to the loggers (and their handlers) that emit such messages."""
    for name in ("", "ray", "ray.tune", "lm_eval", "lm-eval", "DeepSpeed", "deepspeed", "transformers",
                 "ray._private.authentication.authentication_token_setup", "ray.tune.logger.tensorboardx",
                 *_RAY_TRAIN_SCALING_LOGGERS):
        logger = logging.getLogger(name)
        if _HARMLESS not in logger.filters:
            logger.addFilter(_HARMLESS)
        for handler in logger.handlers:
            if _HARMLESS not in handler.filters:
                handler.addFilter(_HARMLESS)


def skip_harmless_worker_lines() -> None:
    """Ray forwards every worker's output to the driver; lines matching :data:`HARMLESS_WORKER_LINES` are skipped
    there (Ray's ``RAY_DEDUP_LOGS_SKIP_REGEX``, read when Ray is imported; set on its log deduplicators when Ray
    already is)."""
    pattern = "|".join(f"(?:{p})" for p in HARMLESS_WORKER_LINES)
    current = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX")
    if current and pattern not in current:
        pattern = f"{current}|{pattern}"
    os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = pattern
    mod = sys.modules.get("ray._private.ray_logging")
    for dedup in (getattr(mod, "stdout_deduplicator", None), getattr(mod, "stderr_deduplicator", None)):
        if dedup is not None and hasattr(dedup, "skip_re"):
            dedup.skip_re = re.compile(pattern)


def skip_git_probe(load: bool = False) -> None:
    """lm-eval records ``git describe`` of the working folder in its results, and outside a git folder git prints
    "fatal: not a git repository" on stderr; the hash describes lm-eval's caller, not the model, so it is left out."""
    if load:  # (shortened.evaluation.zeroshot, about to run lm-eval; elsewhere only an lm-eval already imported)
        import lm_eval.evaluator  # noqa: F401
    evaluator = sys.modules.get("lm_eval.evaluator")
    if evaluator is not None:
        evaluator.get_git_commit_hash = lambda: None


def ray_logging_level() -> int:
    """The level of Ray's own driver logs ("Started a local Ray instance", Tune's result-file notes): INFO with
    ``--verbose``, else WARNING."""
    return logging.INFO if settings.verbose else logging.WARNING


# -- stdout is for results -------------------------------------------------------------------------------------------

_results: list[IO[str]] = []


@contextmanager
def results_on_stdout() -> Iterator[IO[str]]:
    """While a verb runs: ``sys.stdout`` and logging handlers bound to it write to stderr, so what libraries print
    (DeepSpeed's logger writes to stdout; Ray prints workers' stdout on the driver's ``sys.stdout``) cannot mix with
    the verb's result; :func:`result` writes to the real stdout. Yields the real stdout."""
    real = sys.stdout
    moved = _retarget_handlers(real, sys.stderr)
    _results.append(real)
    sys.stdout = sys.stderr
    try:
        yield real
    finally:
        sys.stdout = real
        _results.pop()
        for handler in moved:
            if getattr(handler, "stream", None) is sys.stderr:
                handler.setStream(real)


def _retarget_handlers(old: IO[str], new: IO[str]) -> list[logging.StreamHandler]:
    moved = []
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is old:
                handler.setStream(new)
                moved.append(handler)
    return moved


def result(text: str = "") -> None:
    """Print ``text`` (a verb's result: JSON, a table) on the real stdout, also inside :func:`results_on_stdout`."""
    out = _results[-1] if _results else sys.stdout
    print(text, file=out, flush=True)


# -- training progress (rank 0 of every Ray Train run writes it; the sweep's view reads it) --------------------------

def progress_env(folder: str | Path) -> dict[str, str]:
    """Worker environment that makes rank 0 of each Ray Train run write its progress under ``folder`` (a local or
    shared folder; an object-store URL is skipped: the view then shows no tokens)."""
    quiet = {} if settings.verbose else {WORKER_LOG_LEVEL_ENV: "WARNING"}
    return quiet if "://" in str(folder) else {**quiet, PROGRESS_ENV: str(folder)}


def write_training_progress(run: str, metrics: dict) -> None:
    """Called on rank 0 at every report: ``{PROGRESS_DIR}/{run}.json`` with the tokens trained so far, the loss and
    the time, written atomically. Does nothing when :data:`PROGRESS_ENV` is unset; never raises (progress is a
    view, not a result)."""
    folder = os.environ.get(PROGRESS_ENV)
    if not folder:
        return
    try:
        path = Path(folder) / f"{run}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"tokens": metrics.get("tokens"), "loss": metrics.get("loss"), "time": time.time()}))
        os.replace(tmp, path)
    except Exception as exc:  # noqa: BLE001
        log.debug("could not write training progress for %s: %s", run, exc)


def read_training_progress(folder: str | Path, runs: list[str]) -> tuple[int, float | None]:
    """Tokens trained over ``runs`` (the phases of one trial) and the latest loss, from their progress files."""
    tokens, loss, latest = 0, None, -1.0
    for run in runs:
        try:
            p = json.loads((Path(folder) / f"{run}.json").read_text())
        except (OSError, ValueError):
            continue
        tokens += int(p.get("tokens") or 0)
        if p.get("time", 0) > latest and p.get("loss") is not None:
            latest, loss = p["time"], float(p["loss"])
    return tokens, loss


# -- the sweep's live view ---------------------------------------------------------------------------------------

def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


@dataclass
class TrialRow:
    """One trial as the view shows it. ``state``: pending, running, done, failed; ``phase``: prune, train, eval,
    done (derived from the trial's files while it runs)."""

    key: str
    method: str
    budget: int  # tokens to train over every phase (0: no retraining)
    runs: list[str]  # its Ray Train runs (progress files)
    state: str = "pending"
    phase: str = ""
    tokens: int = 0
    loss: float | None = None
    metric: str = ""  # the finished trial's headline metric
    started: float | None = None
    finished: float | None = None
    train_started: float | None = None
    error: str = ""

    def elapsed(self, now: float) -> float | None:
        if self.started is None:
            return None
        return (self.finished or now) - self.started

    def last_metric(self) -> str:
        if self.metric:
            return self.metric
        return f"loss {self.loss:.3f}" if self.loss is not None else ""


@dataclass
class SweepConsole:
    """The live view of one sweep (see the module doc). Built by the sweep's driver; Tune's callbacks call
    :meth:`trial_started`, :meth:`trial_finished` and :meth:`trial_failed`; a thread polls the trials' files every
    ``poll_s`` for phases and tokens and redraws (terminal) or prints a line per change (no terminal).

    ``layout``: the experiment's :class:`~shortened.sweep.layout.ExperimentLayout`; ``cfg``: its
    :class:`~shortened.sweep.config.SweepConfig`; ``stream``: where the view goes (default stderr);
    ``live``: redraw in place (default: whether ``stream`` is a terminal)."""

    name: str
    layout: Any
    cfg: Any
    stream: IO[str] | None = None
    live: bool | None = None
    poll_s: float = 1.0
    rows: dict[str, TrialRow] = field(default_factory=dict)
    start: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.stream = self.stream or sys.stderr
        if self.live is None:
            self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rich_live = None
        self._metric = getattr(getattr(self.cfg, "selection", None), "metric", None)

    # -- what the sweep tells it ------------------------------------------------------------------------------------

    def add_trials(self, specs: list) -> None:
        """The trials this invocation will run (TrialSpecs), shown as pending until they start."""
        for spec in specs:
            self._row(spec)

    def _row(self, spec) -> TrialRow:
        key = spec.key
        if key not in self.rows:
            method = spec.method
            train = getattr(self.cfg, "train", None)
            tokens = int(getattr(train, "train_tokens", 0) or 0)
            if method in ("dense", "none"):
                budget, runs = 0, []
            elif method == "cpt+lora":
                lora_tokens = int(getattr(getattr(train, "lora", None), "train_tokens", 0) or 0) or tokens
                budget, runs = tokens + lora_tokens, [f"{key}-cpt", f"{key}-lora"]
            else:
                budget, runs = tokens, [key]
            self.rows[key] = TrialRow(key=key, method=method, budget=budget, runs=runs)
        return self.rows[key]

    def trial_started(self, spec) -> None:
        with self._lock:
            row = self._row(spec)
            row.state, row.started, row.finished, row.error = "running", time.time(), None, ""
            row.phase = "eval" if spec.method == "dense" else "prune"
            self._event(row, "started")

    def trial_finished(self, spec, result) -> None:
        """``result``: the trial's :class:`~shortened.sweep.trial.TrialResult`."""
        with self._lock:
            row = self._row(spec)
            row.state, row.phase, row.finished = "done", "done", time.time()
            if row.started is None:
                row.started = row.finished - result.timings.total_s
            row.tokens = result.tokens_trained or row.tokens
            row.metric = self._headline(result)
            self._event(row, "finished")

    def trial_failed(self, spec, error: str) -> None:
        with self._lock:
            row = self._row(spec)
            row.state, row.finished = "failed", time.time()
            row.error = error.strip().splitlines()[-1] if error.strip() else "see the Tune log"
            self._event(row, "FAILED", f": {row.error}")

    def trial_stopped(self, spec, tokens: int, why: str) -> None:
        """The scheduler (ASHA) stopped the trial early at ``tokens``; ``why``: its last validation metric."""
        with self._lock:
            row = self._row(spec)
            row.state, row.phase, row.finished = "stopped", "stopped", time.time()
            row.tokens, row.metric = tokens, why
            self._event(row, "stopped early (scheduler)")

    def note(self, text: str) -> None:
        """A one-off line between the rows (scoring, the speed pass)."""
        with self._lock:
            self._print(f"{self._prefix()} {text}")

    def _headline(self, result) -> str:
        metrics = {f"{m.name}:{m.dataset}": m.value for m in result.metrics}
        metrics.update({m.name: m.value for m in result.metrics if m.name == "zeroshot_mean"})
        if self._metric and self._metric in metrics:
            return f"{self._metric} {metrics[self._metric]:.4g}"
        return result.summary()

    # -- polling the trials' files ----------------------------------------------------------------------------------

    def poll(self) -> None:
        """Update phases, tokens and losses of running trials from their files; print a line per phase change when
        not live."""
        from shortened.pruning import PRUNING_JSON
        from shortened.training.export import RETRAINING_JSON

        with self._lock:
            for row in self.rows.values():
                if row.state != "running" or row.phase in ("eval", "done"):
                    continue
                layout = self.layout
                if row.runs:
                    row.tokens, loss = read_training_progress(layout.root / "progress", row.runs)
                    row.loss = loss if loss is not None else row.loss
                phase = row.phase
                if phase == "prune" and (layout.pruned(row.key) / PRUNING_JSON).is_file():
                    phase = "train" if row.budget else "eval"
                if phase == "train" and (layout.trained(row.key) / RETRAINING_JSON).is_file():
                    phase = "eval"
                if phase != row.phase:
                    if phase == "train":
                        row.train_started = time.time()
                    row.phase = phase
                    self._event(row, "training" if phase == "train" else "evaluating")

    # -- drawing ------------------------------------------------------------------------------------------------------

    def _counts(self) -> tuple[int, int, int]:
        rows = list(self.rows.values())
        return (sum(r.state in ("done", "failed", "stopped") for r in rows), sum(r.state == "running" for r in rows),
                len(rows))

    def _prefix(self) -> str:
        done, _, total = self._counts()
        counts = f" {done}/{total} done ·" if total else ""
        return f"[sweep {self.name}] {time.strftime('%H:%M:%S')}{counts}"

    def eta(self, row: TrialRow, now: float) -> float | None:
        """Seconds left for a running trial: its training rate over the tokens left, plus the mean evaluation time
        of finished trials; without a rate, the mean duration of finished trials of its method (or any) less its
        elapsed time."""
        if row.state != "running":
            return 0.0 if row.state == "done" else None
        finished = [r for r in self.rows.values() if r.state == "done" and r.started and r.finished]
        same = [r for r in finished if r.method == row.method] or finished
        mean_total = sum(r.finished - r.started for r in same) / len(same) if same else None
        elapsed = row.elapsed(now) or 0.0
        if row.phase == "train" and row.tokens and row.train_started and row.budget:
            rate = row.tokens / max(1e-6, now - row.train_started)
            return max(0.0, (row.budget - row.tokens) / rate)
        return max(0.0, mean_total - elapsed) if mean_total is not None else None

    def totals(self, now: float) -> str:
        done, running, total = self._counts()
        etas = [self.eta(r, now) for r in self.rows.values() if r.state == "running"]
        finished = [r.finished - r.started for r in self.rows.values() if r.state == "done" and r.started]
        pending = sum(r.state == "pending" for r in self.rows.values())
        eta = None
        if finished and all(e is not None for e in etas):
            per = sum(finished) / len(finished)
            slots = max(1, running)
            eta = max(etas, default=0.0) + per * pending / slots
        return (f"{done}/{total} done, {running} running · elapsed {_minutes(now - self.start)}"
                f"{' · ETA ' + _minutes(eta) if eta is not None else ''}")

    def _line(self, row: TrialRow, now: float) -> str:
        """A plain line: key, tokens / budget, last metric, elapsed, ETA."""
        tokens = f"{row.tokens:,}/{row.budget:,} tokens" if row.budget else ""
        eta = self.eta(row, now) if row.state == "running" else None
        elapsed = row.elapsed(now)
        parts = [row.key, tokens, row.last_metric(), f"{_minutes(elapsed)} elapsed" if elapsed and elapsed >= 1 else "",
                 f"ETA {_minutes(eta)}" if eta else ""]
        return " · ".join(p for p in parts if p)

    def _event(self, row: TrialRow, what: str, tail: str = "") -> None:
        if self.live:
            return  # the table shows it
        self._print(f"{self._prefix()} {what} {self._line(row, time.time())}{tail}")

    def _print(self, text: str) -> None:
        if self._rich_live is not None:
            self._rich_live.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def table(self):
        """The view as a ``rich`` table: one row per trial and a totals caption."""
        from rich.table import Table

        now = time.time()
        t = Table(title=f"sweep {self.name}", caption=self.totals(now), title_justify="left", caption_justify="left")
        for col in ("trial", "state", "phase", "tokens / budget", "last metric", "elapsed", "ETA"):
            t.add_column(col, justify="right" if col in ("tokens / budget", "elapsed", "ETA") else "left")
        style = {"done": "green", "failed": "red", "stopped": "yellow", "running": "cyan", "pending": "dim"}
        with self._lock:
            for r in self.rows.values():
                eta = self.eta(r, now)
                t.add_row(r.key, f"[{style[r.state]}]{r.state}[/]", r.phase or "-",
                          f"{r.tokens:,} / {r.budget:,}" if r.budget else "-", r.last_metric() or r.error,
                          _minutes(r.elapsed(now)) if r.started else "-",
                          _minutes(eta) if r.state == "running" else "-")
        return t

    # -- lifetime ---------------------------------------------------------------------------------------------------

    def __enter__(self) -> SweepConsole:
        if not settings.verbose:
            os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy reporter is silent at verbose=0
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._rich_live = Live(get_renderable=self.table, console=Console(file=self.stream),
                                   refresh_per_second=2, transient=False)
            self._rich_live.start()
        self._thread = threading.Thread(target=self._run, name="sweep-console", daemon=True)
        self._thread.start()
        _active.append(self)
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - the view must never stop the sweep
                log.debug("sweep console: %s", exc)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self in _active:
            _active.remove(self)
        if self._rich_live is not None:
            self._rich_live.stop()
            self._rich_live = None
        else:
            done, _, total = self._counts()
            failed = sum(r.state == "failed" for r in self.rows.values())
            stopped = sum(r.state == "stopped" for r in self.rows.values())
            notes = ", ".join([f"{failed} failed"] * bool(failed) + [f"{stopped} stopped early"] * bool(stopped))
            if total:
                self._print(f"[sweep {self.name}] {time.strftime('%H:%M:%S')} {done} of {total} trial(s) ended"
                            f"{f' ({notes})' if notes else ''}; {_minutes(time.time() - self.start)} in all")


_active: list[SweepConsole] = []


def active() -> SweepConsole | None:
    """The view of the sweep this process is running, if any."""
    return _active[-1] if _active else None


def note(text: str) -> None:
    """A line in the running sweep's view, else a log line on stderr."""
    view = active()
    if view is not None:
        view.note(text)
    else:
        print(text, file=sys.stderr, flush=True)
