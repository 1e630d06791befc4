"""The sweep: Ray Tune trials over criteria × pruning amounts × retraining methods, a results store, selection of
the ratio to ship, and a report. ``shortened sweep CONFIG.yaml`` runs it; ``results``, ``select`` and ``report``
read it back."""

from shortened.sweep.config import Resources, Selection, SweepConfig, load_sweep_config

__all__ = ["Resources", "Selection", "SweepConfig", "load_sweep_config"]
