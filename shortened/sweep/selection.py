"""Pick the pruning ratio to ship from a sweep's trials. Plain functions over the store's trial dicts.

Policies:
  * ``max_ratio_within``: the largest actual ratio whose metric stays within ``tolerance_pct`` of the dense baseline
    (perplexity may rise by at most that %, an accuracy fall by at most that %); ties go to the better metric.
  * ``best_under_budget``: the best metric among trials with params ≤ ``max_params`` and/or batch-1 latency
    ≤ ``max_latency_s``.
  * ``pareto``: the frontier of (ratio ↑, metric best); the pick is its knee (farthest from the line joining its
    ends, in normalized units).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shortened.errors import ShortenedError
from shortened.sweep.config import Selection
from shortened.sweep.trial import DENSE

LOWER_IS_BETTER = {"ppl", "latency_s", "peak_memory_mb", "model_memory_mb", "generation_peak_mb"}


def lower_is_better(metric: str) -> bool:
    return metric.split(":")[0] in LOWER_IS_BETTER


def metric_value(trial: dict, metric: str) -> float | None:
    """``NAME`` or ``NAME:DATASET`` of a trial (``ppl:wikitext2``, ``acc:piqa``, ``zeroshot_mean``)."""
    name, _, dataset = metric.partition(":")
    for m in trial["metrics"]:
        if m["name"] == name and (not dataset or m["dataset"] == dataset):
            return m["value"]
    return None


def known_metrics(trials: list[dict]) -> list[str]:
    """Every metric the trials carry, as ``NAME:DATASET``, plus each bare ``NAME`` that has one dataset only
    (``zeroshot_mean``), sorted."""
    pairs = {(m["name"], m["dataset"]) for t in trials for m in (t.get("metrics") or [])}
    names: dict[str, int] = {}
    for name, _ in pairs:
        names[name] = names.get(name, 0) + 1
    return sorted({f"{n}:{d}" if d else n for n, d in pairs} | {n for n, count in names.items() if count == 1})


def unknown_metric(trials: list[dict], metric: str) -> str | None:
    """Why ``metric`` is unknown when no trial has it although some have metrics (a typo such as
    ``ppl:wikitext``), listing the ones the experiment has; None when it is known or nothing has finished."""
    if not any(t.get("metrics") for t in trials) or any(metric_value(t, metric) is not None for t in trials):
        return None
    return f"unknown metric {metric!r}: the experiment has {', '.join(known_metrics(trials))}"


def within(value: float, base: float, tolerance_pct: float, lower: bool) -> bool:
    limit = base * (1 + tolerance_pct / 100) if lower else base * (1 - tolerance_pct / 100)
    return value <= limit if lower else value >= limit


@dataclass
class Choice:
    policy: str
    metric: str
    chosen: dict | None
    reason: str
    baseline: float | None = None
    candidates: list[dict] = field(default_factory=list)  # {key, ratio, value, ok}
    frontier: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"policy": self.policy, "metric": self.metric, "baseline": self.baseline, "reason": self.reason,
                "chosen": self.chosen and {k: self.chosen[k] for k in ("key", "ratio_actual", "method", "criterion",
                                                                         "removed_blocks", "params", "model_path")},
                "candidates": self.candidates, "frontier": self.frontier}


def pareto_front(points: list[tuple[str, float, float]], lower: bool) -> list[str]:
    """Keys of the non-dominated (key, ratio, value) points: no other has ratio ≥ and metric at least as good,
    with one strictly better. Sorted by ratio."""
    def better_or_eq(a: float, b: float) -> bool:
        return a <= b if lower else a >= b

    front = []
    for k, r, v in points:
        dominated = any(r2 >= r and better_or_eq(v2, v) and (r2 > r or v2 != v) for k2, r2, v2 in points if k2 != k)
        if not dominated:
            front.append((r, k))
    return [k for _, k in sorted(front)]


def select(trials: list[dict], policy: Selection, *, strict: bool = False) -> Choice:
    """The choice under ``policy``. A metric that no trial has is a :class:`ShortenedError` naming the metrics
    the experiment has (``strict``), or a choice of nothing whose reason says so (``strict=False``: the end of a
    sweep, which should still store its trials)."""
    metric, lower = policy.metric, lower_is_better(policy.metric)
    unknown = unknown_metric(trials, metric)
    if unknown and strict:
        raise ShortenedError(unknown)
    if unknown:
        return Choice(policy.policy, metric, None, unknown)
    done = [t for t in trials if t["status"] == "completed"]
    dense = next((t for t in done if t["key"] == DENSE), None)
    base = metric_value(dense, metric) if dense else None
    pruned = [t for t in done if t["key"] != DENSE and metric_value(t, metric) is not None]
    choice = Choice(policy.policy, metric, None, "", baseline=base)
    if not pruned:
        choice.reason = f"no completed pruned trial has {metric}"
        return choice

    def better(t: dict) -> float:
        v = metric_value(t, metric)
        return -v if lower else v

    for t in pruned:
        choice.candidates.append({"key": t["key"], "ratio": t["ratio_actual"], "value": metric_value(t, metric)})
    if policy.policy == "max_ratio_within":
        if base is None:
            raise ShortenedError(f"max_ratio_within needs the dense baseline's {metric}, which the store lacks")
        for c in choice.candidates:
            c["ok"] = within(c["value"], base, policy.tolerance_pct, lower)
        ok = [t for t, c in zip(pruned, choice.candidates) if c["ok"]]
        if not ok:
            choice.reason = (f"no trial keeps {metric} within {policy.tolerance_pct:g}% of the dense "
                             f"{base:.4g}; ship the dense model or loosen the tolerance")
            return choice
        choice.chosen = max(ok, key=lambda t: (t["ratio_actual"], better(t)))
        choice.reason = (f"largest ratio ({choice.chosen['ratio_actual']:.3f}) whose {metric} "
                         f"{metric_value(choice.chosen, metric):.4g} is within {policy.tolerance_pct:g}% of the "
                         f"dense {base:.4g}")
    elif policy.policy == "best_under_budget":
        def fits(t: dict) -> bool:
            ok = policy.max_params is None or (t["params"] or 0) <= policy.max_params
            if policy.max_latency_s is not None:
                lat = metric_value(t, "latency_s")
                ok = ok and lat is not None and lat <= policy.max_latency_s
            return ok

        for t, c in zip(pruned, choice.candidates):
            c["ok"] = fits(t)
        ok = [t for t in pruned if fits(t)]
        budget = " and ".join(s for s in (policy.max_params and f"params ≤ {policy.max_params:,}",
                                           policy.max_latency_s and f"latency ≤ {policy.max_latency_s:g} s") if s)
        if not ok:
            choice.reason = f"no trial fits the budget {budget}"
            return choice
        choice.chosen = max(ok, key=lambda t: (better(t), t["ratio_actual"]))
        choice.reason = (f"best {metric} ({metric_value(choice.chosen, metric):.4g}) among the {len(ok)} trials "
                         f"with {budget}")
    else:  # pareto
        points = [(c["key"], c["ratio"], c["value"]) for c in choice.candidates]
        if dense and base is not None:
            points.append((DENSE, 0.0, base))
        choice.frontier = pareto_front(points, lower)
        for c in choice.candidates:
            c["ok"] = c["key"] in choice.frontier
        front = [p for p in points if p[0] in choice.frontier]
        front.sort(key=lambda p: p[1])
        knee = _knee(front)
        choice.chosen = next((t for t in pruned if t["key"] == knee), None)
        choice.reason = (f"knee of the {len(front)}-point Pareto frontier of ratio vs {metric}: "
                         f"{', '.join(p[0] for p in front)}")
        if choice.chosen is None:
            choice.reason += " (the knee is the dense model)"
    return choice


def _knee(front: list[tuple[str, float, float]]) -> str:
    """The frontier point farthest from the chord joining its ends (both axes scaled to [0, 1])."""
    if len(front) <= 2:
        return front[-1][0]
    rs, vs = [p[1] for p in front], [p[2] for p in front]
    rspan, vspan = (max(rs) - min(rs)) or 1.0, (max(vs) - min(vs)) or 1.0
    pts = [((r - min(rs)) / rspan, (v - min(vs)) / vspan) for r, v in zip(rs, vs)]
    (x0, y0), (x1, y1) = pts[0], pts[-1]
    dist = [abs((y1 - y0) * x - (x1 - x0) * y + x1 * y0 - y1 * x0) for x, y in pts]
    return front[max(range(len(front)), key=dist.__getitem__)][0]
