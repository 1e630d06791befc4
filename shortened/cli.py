"""The ``shortened`` command line: one verb per job (``score``, ``prune``, ``prune-width``, ``retrain``, ``eval``,
``data``, ``sweep``, ``results``, ``select``, ``report``)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from shortened import io
from shortened.errors import Interrupted, ShortenedError, validated

log = logging.getLogger("shortened")


def _number(kind: type, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            hi_open: bool = False):
    """An argparse ``type`` for an int or float in a range; argparse names the flag in front of the message
    (``argument --calib-samples: must be an integer >= 1, got '-3'``) and exits 2 before any work."""
    what = "an integer" if kind is int else "a number"
    bounds = []
    if lo is not None:
        bounds.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        bounds.append(f"{'<' if hi_open else '<='} {hi:g}")
    if lo is not None and hi is not None:
        desc = f"{what} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    else:
        desc = " ".join([what, *bounds])

    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {desc}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {desc}, got {text!r}")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise argparse.ArgumentTypeError(f"must be {desc}, got {text!r}")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise argparse.ArgumentTypeError(f"must be {desc}, got {text!r}")
        return value

    parse.__name__ = desc  # argparse's fallback wording ("invalid <name> value") if it ever uses it
    return parse


def _mixture(text: str) -> dict:
    """``--mixture``: a JSON object of set name -> weight >= 0."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
            for w in value.values()):
        raise argparse.ArgumentTypeError(f'must be a JSON object of set weights >= 0 (e.g. \'{{"RedPajamaC4": 2}}\'), '
                                         f"got {text!r}")
    return value


COUNT = _number(int, 1)  # a count of things: >= 1
NON_NEGATIVE = _number(int, 0)
SEQ_LEN = _number(int, 2)  # a window needs an input and a target token
SEED = _number(int, 0)  # numpy's default_rng refuses negative seeds


def RATIO(text: str) -> float:  # noqa: N802 (an argparse type, named like the others)
    """The fraction of parameters removed: [0, 1) (1 would remove everything)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value < 1):
        raise argparse.ArgumentTypeError(f"ratio {text} must be in [0, 1) (a number, the fraction of parameters "
                                         "removed)")
    return value


POSITIVE = _number(float, 0, lo_open=True)
FRACTION = _number(float, 0, 1)


def COUNT_OR_AUTO(text: str) -> int | str:  # noqa: N802 (an argparse type, named like the others)
    """A count >= 1 or ``auto`` (lm-eval's batch-size search)."""
    return "auto" if text.strip().lower() == "auto" else COUNT(text)


SAVE_DTYPE_HELP = ("dtype of the saved weights: auto (default; the source model's: its config.json dtype; a GGUF "
                   "file: the dtype its weights are stored in, float32 when quantized), float32, bfloat16, float16")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="hub id, local HF folder, .gguf file, folder with one .gguf, or 'smollm2'")
    p.add_argument("--gguf-file", help="GGUF file name inside the --model folder")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--attn-implementation", default="auto",
                   help="auto (flash_attention_2 on CUDA in bf16/fp16 when flash-attn is installed, else sdpa; eager "
                        "for models without sdpa), sdpa, eager, flash_attention_2, ...")


def _model_options(args: argparse.Namespace) -> dict:
    """load_model's device, dtype and attention options from the flags of _add_model_args."""
    return {"device": args.device, "dtype": args.dtype, "attn_implementation": args.attn_implementation}


def _add_tokenizer_arg(p: argparse.ArgumentParser, why: str) -> None:
    p.add_argument("--tokenizer", help=f"where the tokenizer is when the --model folder has none (trainer outputs "
                                       f"often lack one): a folder, hub id or .gguf; {why}")


def _add_scoring_args(p: argparse.ArgumentParser) -> None:
    from shortened.criteria import CRITERIA
    from shortened.pruning import KEEP_FIRST, KEEP_LAST

    p.add_argument("--criterion", required=True, help=f"one of: {', '.join(CRITERIA)}")
    p.add_argument("--keep-first", type=NON_NEGATIVE, default=KEEP_FIRST,
                   help=f"never remove the first N blocks (paper: {KEEP_FIRST})")
    p.add_argument("--keep-last", type=NON_NEGATIVE, default=KEEP_LAST,
                   help=f"never remove the last N blocks (paper: {KEEP_LAST})")
    p.add_argument("--calib-source", default="slimpajama-sample",
                   help="corpus for calibration: file, folder, glob, hf:NAME, or slimpajama-sample")
    p.add_argument("--calib-samples", type=COUNT, default=10, help="calibration samples (paper: 10)")
    p.add_argument("--calib-seq-len", type=SEQ_LEN, default=128, help="tokens per calibration sample (paper: 128)")
    p.add_argument("--seed", type=SEED, default=0, help="seed for drawing the calibration windows")
    p.add_argument("--batch-size", type=COUNT, default=1, help="calibration samples per forward")
    _add_tokenizer_arg(p, "needed for criteria that read calibration text (all but magnitude)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_amount_args(p: argparse.ArgumentParser, required: bool) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--ratio", type=RATIO, help="fraction of parameters to remove, rounded down to whole blocks "
                                                    "(in [0, 1))")
    group.add_argument("--blocks", type=NON_NEGATIVE, help="number of blocks to remove")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``shortened VERB: error: …``), like every other refusal; usage stays in
    ``--help``. Subcommand parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from shortened.training.config import METHODS, TrainConfig

    parser = _Parser(prog="shortened", description="Depth pruning of decoder LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser("score", help="score every block with one criterion and save the scores as JSON")
    _add_model_args(score)
    _add_scoring_args(score)
    _add_amount_args(score, required=False)  # only 'iterative' uses it: how many removal steps to run
    score.add_argument("--out", required=True, help="scores JSON file to write")
    score.add_argument("--overwrite", action="store_true")
    score.set_defaults(func=cmd_score)

    prune = sub.add_parser("prune", help="remove blocks and save a standard HF checkpoint with pruning.json")
    _add_model_args(prune)
    _add_scoring_args(prune)
    _add_amount_args(prune, required=True)
    prune.add_argument("--scores", help="reuse a scores JSON from `shortened score` (skips scoring)")
    prune.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    prune.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    prune.add_argument("--save-dtype", default="auto", choices=io.SAVE_DTYPES, help=SAVE_DTYPE_HELP)
    prune.set_defaults(func=cmd_prune)

    pw = sub.add_parser("prune-width", help="the width baseline: remove head groups and MLP channels from every "
                                            "block to a parameter budget; saves an HF checkpoint")
    _add_model_args(pw)
    budget = pw.add_mutually_exclusive_group(required=True)
    budget.add_argument("--ratio", type=RATIO, help="fraction of parameters to remove (in [0, 1))")
    budget.add_argument("--params", type=COUNT, help="parameter count to end at (or just under)")
    budget.add_argument("--like", help="a depth-pruned folder: match its parameter count (its pruning.json)")
    pw.add_argument("--score", default="activation", choices=["activation", "magnitude"],
                    help="activation: Wanda-style |input| x weight norm on calibration text (default); magnitude: "
                         "weight norms, data-free")
    pw.add_argument("--calib-source", default="slimpajama-sample", help="corpus for activation scores")
    pw.add_argument("--calib-samples", type=COUNT, default=10)
    pw.add_argument("--calib-seq-len", type=SEQ_LEN, default=128)
    pw.add_argument("--seed", type=SEED, default=0)
    _add_tokenizer_arg(pw, "needed for --score activation")
    pw.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    pw.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    pw.add_argument("--save-dtype", default="auto", choices=io.SAVE_DTYPES, help=SAVE_DTYPE_HELP)
    pw.set_defaults(func=cmd_prune_width)

    rt = sub.add_parser("retrain", help="heal a pruned model: CPT, LoRA, CPT+LoRA or distillation on Ray Train "
                                         "with DeepSpeed ZeRO; re-running the same --name resumes")
    rt.add_argument("--model", required=True, help="the (pruned) HF model folder")
    rt.add_argument("--method", choices=METHODS, help=f"default: {TrainConfig.model_fields['method'].default}")
    rt.add_argument("--config", help="YAML with TrainConfig fields (flags below override it)")
    rt.add_argument("--data", help="training data source (file, folder, glob, s3://…, hf:NAME, slimpajama-sample)")
    rt.add_argument("--train-tokens", type=COUNT, help="token budget across all workers")
    rt.add_argument("--seq-len", type=SEQ_LEN)
    rt.add_argument("--micro-batch-size", type=COUNT)
    rt.add_argument("--grad-accum", type=COUNT)
    rt.add_argument("--lr", type=POSITIVE)
    rt.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3],
                    help="DeepSpeed ZeRO stage of full-parameter training (cpt, distill, the CPT phase of cpt+lora)")
    rt.add_argument("--lora-zero-stage", type=int, choices=[0, 1, 2, 3],
                    help="ZeRO stage of the LoRA phase (default 2: the frozen weights stay whole on each GPU)")
    rt.add_argument("--teacher", help="distill: the unpruned model (default: pruning.json's model)")
    rt.add_argument("--workers", type=COUNT, default=2, help="Ray Train workers")
    rt.add_argument("--use-gpu", action="store_true")
    rt.add_argument("--cpus-per-worker", type=POSITIVE, default=1)
    rt.add_argument("--placement", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
    rt.add_argument("--max-failures", type=NON_NEGATIVE, default=0, help="restart failed workers from the last checkpoint")
    rt.add_argument("--storage-path", default=str(Path.home() / "ray_results"),
                    help="Ray Train storage (shared storage on multi-node clusters)")
    rt.add_argument("--name", help="run name (default: the output folder's name); the same name resumes")
    rt.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    rt.add_argument("--out", required=True, help="folder for the retrained HF checkpoint")
    rt.add_argument("--save-dtype", choices=io.SAVE_DTYPES,
                    help="dtype of the exported weights: auto (default; the --model folder's config.json dtype, else "
                         "the training dtype), float32, bfloat16, float16")
    rt.add_argument("--attn-implementation",
                    help="attention kernel for training: auto (default; flash_attention_2 on CUDA in bf16/fp16 when "
                         "flash-attn is installed, else sdpa), sdpa, eager, flash_attention_2, ...")
    rt.add_argument("--overwrite", action="store_true")
    rt.set_defaults(func=cmd_retrain)

    ev = sub.add_parser("eval", help="perplexity, zero-shot accuracy (lm-eval) and generation speed of a model")
    _add_model_args(ev)
    ev.add_argument("--ppl", help="perplexity datasets: wikitext2,ptb,ptb_valid,c4 ('' for none; default "
                                  "wikitext2,ptb when neither --tasks nor --speed is given)")
    ev.add_argument("--ppl-protocol", default="paper", choices=["paper", "gptq"],
                    help="paper: 128-token windows; gptq: 2048")
    ev.add_argument("--ppl-seq-len", type=SEQ_LEN, help="override the protocol's window length")
    ev.add_argument("--ppl-bos", default="auto", choices=["auto", "first", "every", "none"],
                    help="BOS on the first window only (auto: if the tokenizer adds one), on every window, or none")
    ev.add_argument("--ppl-windows", type=COUNT, help="evaluate only the first N windows (quick runs)")
    ev.add_argument("--tasks", help="zero-shot tasks, comma-separated, or 'all': boolq,piqa,hellaswag,winogrande,"
                                    "arc_easy,arc_challenge,openbookqa")
    ev.add_argument("--tasks-source", default="local", choices=["local", "hub"],
                    help="local files in ../shared/data (offline) or lm-eval's hub tasks")
    ev.add_argument("--limit", type=COUNT, help="zero-shot items per task (quick runs; default: full splits)")
    ev.add_argument("--speed", action="store_true", help="generation latency/throughput and peak memory")
    ev.add_argument("--speed-batch-sizes", default="1", help="comma-separated (paper: 1,...,256)")
    ev.add_argument("--speed-new-tokens", default="128", help="comma-separated forced output lengths (paper: 128,512)")
    ev.add_argument("--speed-repeats", type=COUNT, default=3)
    ev.add_argument("--speed-warmup", type=NON_NEGATIVE, default=1)
    ev.add_argument("--baseline", help="a second model for --speed, run alternately; rows get speedups over it")
    ev.add_argument("--batch-size", type=COUNT, default=8, help="sequences per forward for ppl and zero-shot")
    ev.add_argument("--zeroshot-batch-size", type=COUNT_OR_AUTO,
                    help="zero-shot sequences per forward, or 'auto' (lm-eval finds the largest that fits); default: "
                         "auto on a GPU, --batch-size on a CPU")
    _add_tokenizer_arg(ev, "perplexity, zero-shot and speed all need one")
    ev.add_argument("--zeroshot-cache", help="folder for lm-eval's response cache (one file per model weights): an "
                                             "interrupted zero-shot run resumes where it stopped")
    ev.add_argument("--out", required=True, help="results JSON file to write")
    ev.add_argument("--overwrite", action="store_true")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_eval)

    sw = sub.add_parser("sweep", help="the main job: Ray Tune trials over criteria × ratios × methods (prune → "
                                      "retrain → evaluate), a results store, and the selected ratio")
    sw.add_argument("config", help="sweep YAML (see jobs/configs/demo.yaml)")
    sw.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are kept")
    sw.add_argument("--name", help="override the config's experiment name")
    sw.add_argument("--storage-path", help="override storage_path (shared storage on a multi-node cluster)")
    sw.add_argument("--store", help="override store_url (e.g. postgresql://user@host/db)")
    sw.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    sw.set_defaults(func=cmd_sweep)

    for verb, helptext, fn in (("results", "print an experiment's trials and metrics", cmd_results),
                               ("select", "choose the trial to ship by a policy, and say why", cmd_select),
                               ("report", "write a Markdown/HTML report with plots", cmd_report)):
        p = sub.add_parser(verb, help=helptext)
        p.add_argument("experiment", help="experiment folder (STORAGE/NAME), or a name with --store/--storage-path")
        p.add_argument("--store", help="results store URL (default: the experiment folder's SQLite file)")
        p.add_argument("--storage-path", default="runs", help="where experiment folders live (default: runs)")
        p.set_defaults(func=fn)
        if verb == "results":
            p.add_argument("--format", default="table", choices=["table", "json", "csv"])
        if verb == "select":
            p.add_argument("--policy", choices=["max_ratio_within", "best_under_budget", "pareto"])
            p.add_argument("--metric", help="ppl:wikitext2, zeroshot_mean, acc:piqa, ... (default: the config's)")
            p.add_argument("--tolerance", type=_number(float, 0), help="max_ratio_within: allowed %% change from "
                                                                       "dense (>= 0)")
            p.add_argument("--max-params", type=COUNT, help="best_under_budget: parameter budget")
            p.add_argument("--max-latency", type=POSITIVE, help="best_under_budget: batch-1 latency budget (s)")
        if verb == "report":
            p.add_argument("--out", help="folder for the report and plots (default: EXPERIMENT/report)")
            p.add_argument("--format", default="md", choices=["md", "html"])

    data = sub.add_parser("data", help="check a training corpus: shards, rank split, documents per set, bad lines, "
                                       "tokens")
    data.add_argument("source", help="file, folder, glob, s3://…/gs://… URL, hf:NAME, or slimpajama-sample")
    data.add_argument("--split", help="split of slimpajama-sample or an hf: dataset (default: train)")
    data.add_argument("--format", default="text", choices=["text", "alpaca"])
    data.add_argument("--text-field", default="text")
    data.add_argument("--mixture", type=_mixture, help='set weights as JSON, e.g. \'{"RedPajamaC4": 2}\'')
    data.add_argument("--world-size", type=COUNT, default=1, help="show how this many ranks would share it")
    data.add_argument("--max-bad-fraction", type=FRACTION, default=0.01)
    data.add_argument("--tokenizer", help="model whose tokenizer counts the tokens (slower: tokenizes everything)")
    data.add_argument("--gguf-file", help="GGUF file name inside the --tokenizer folder")
    data.set_defaults(func=cmd_data)
    return parser


def _check_common(args: argparse.Namespace) -> None:
    """Checks that need no model, so bad input fails in a second and writes nothing."""
    from shortened.criteria import DATA_FREE, get_criterion
    from shortened.pruning import check_ratio

    get_criterion(args.criterion)
    if args.criterion not in DATA_FREE and not getattr(args, "scores", None):  # --scores: nothing is scored
        _calibration_config(args)
    if getattr(args, "ratio", None) is not None:
        check_ratio(args.ratio)
    if args.keep_first < 0 or args.keep_last < 0:
        raise ShortenedError(f"--keep-first/--keep-last must be >= 0, got {args.keep_first}/{args.keep_last}")


def _source(args: argparse.Namespace):
    """``--model`` (and ``--gguf-file``) resolved once, before any work: a missing local path is named here."""
    from shortened.models import resolve_source

    if getattr(args, "source", None) is None:
        args.source = resolve_source(args.model, args.gguf_file, what="--model")
    return args.source


def _tokenizer(args: argparse.Namespace, needed_for: str | None):
    """The tokenizer from ``--tokenizer``, else the ``--model`` folder's. A model without one (common for trainer
    outputs) is fine when nothing needs text (``needed_for`` None: a warning, and the output has no tokenizer);
    otherwise the error says what needs it and points at ``--tokenizer``."""
    from shortened.models import load_tokenizer

    from shortened.models import resolve_source

    if getattr(args, "tokenizer", None):
        return load_tokenizer(resolve_source(args.tokenizer, what="--tokenizer"))
    source = _source(args)
    try:
        return load_tokenizer(source)
    except ShortenedError as exc:
        if needed_for is None:
            log.warning("model %s has no usable tokenizer (%s); continuing without one: the output will have no "
                        "tokenizer files (add them, or pass --tokenizer PATH)", args.model, exc)
            return None
        raise ShortenedError(f"{needed_for} needs the model's tokenizer, and none could be loaded from "
                             f"{args.model!r}; pass --tokenizer PATH (a folder, hub id or .gguf holding the "
                             f"tokenizer this model was trained with) ({exc})") from exc


def _recorded_model(spec: str) -> str:
    """What records name: a local model as an absolute path (a distillation teacher is read back from
    ``pruning.json`` by workers that run elsewhere), a hub id or alias as given."""
    from pathlib import Path

    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _calibration_config(args: argparse.Namespace):
    from shortened.data.calibration import CalibrationConfig

    cfg = validated(CalibrationConfig, dict(source=args.calib_source, n_samples=args.calib_samples,
                                            seq_len=args.calib_seq_len, seed=args.seed), "calibration option")
    _check_local_source(cfg.source, cfg.split, "--calib-source")
    return cfg


def _check_local_source(source: str, split: str, flag: str) -> None:
    """A local corpus that is missing or empty fails here, before the model loads (remote and hub sources are
    listed when read)."""
    from shortened.data.sources import is_hub, resolve_alias, resolve_shards

    resolved = resolve_alias(source, split)
    if is_hub(resolved) or "://" in resolved:
        return
    try:
        resolve_shards(resolved)
    except ShortenedError as exc:
        raise ShortenedError(f"{flag}: {exc}") from exc


def _scores_for(args: argparse.Namespace, model, n_remove: int | None, tokenizer=None):
    """:func:`shortened.pruning.score_with_calibration` with the scoring flags (calibration windows from
    ``tokenizer`` unless the criterion is data-free)."""
    from shortened.criteria import DATA_FREE
    from shortened.pruning import score_with_calibration

    cfg = None
    if args.criterion not in DATA_FREE:
        cfg = _calibration_config(args)
        if tokenizer is None:
            tokenizer = _tokenizer(args, f"criterion {args.criterion!r} (calibration text)")
    return score_with_calibration(model, args.criterion, tokenizer=tokenizer, calibration=cfg,
                                  keep_first=args.keep_first, keep_last=args.keep_last, batch_size=args.batch_size,
                                  n_remove=n_remove, ratio=getattr(args, "ratio", None), progress=not args.quiet,
                                  model_name=_recorded_model(args.model), seq_len_option="--calib-seq-len")


def cmd_score(args: argparse.Namespace) -> int:
    from shortened.criteria import DATA_FREE
    from shortened.io import check_output
    from shortened.models import load_model
    from shortened.pruning import resolve_block_count

    _check_common(args)
    out = check_output(args.out, kind="file", overwrite=args.overwrite, flag="--out", create=False)
    _source(args)
    tokenizer = None
    if args.criterion not in DATA_FREE:  # before the model loads: a missing tokenizer fails in a second
        tokenizer = _tokenizer(args, f"criterion {args.criterion!r} (calibration text)")
    check_output(out, kind="file", overwrite=args.overwrite, flag="--out")  # every check passed: create folders
    model = load_model(_source(args), **_model_options(args))
    n_remove = None
    if args.ratio is not None or args.blocks is not None:
        n_remove = resolve_block_count(model, ratio=args.ratio, blocks=args.blocks,
                                       keep_first=args.keep_first, keep_last=args.keep_last)
    scores = _scores_for(args, model, n_remove, tokenizer)
    scores.save(out)
    print(json.dumps({"criterion": scores.criterion, "scores": [round(s, 4) for s in scores.scores],
                      "out": str(out)}))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from shortened.criteria import BlockScores
    from shortened.criteria import DATA_FREE
    from shortened.io import check_output
    from shortened.models import load_model
    from shortened.pruning import check_scores_fit, prune_and_save, resolve_block_count

    _check_common(args)
    check_output(args.out, kind="dir", overwrite=args.overwrite, flag="--out", create=False)
    _source(args)
    saved = BlockScores.load(args.scores) if args.scores else None
    needs_text = saved is None and args.criterion not in DATA_FREE
    tokenizer = _tokenizer(args, f"criterion {args.criterion!r} (calibration text)" if needs_text else None)
    check_output(args.out, kind="dir", overwrite=args.overwrite, flag="--out")
    model = load_model(_source(args), **_model_options(args))
    n_remove = resolve_block_count(model, ratio=args.ratio, blocks=args.blocks,
                                   keep_first=args.keep_first, keep_last=args.keep_last)
    if saved is not None:
        check_scores_fit(saved, model, args.criterion)
        saved.dtype_mismatch(model.dtype, where=f"--scores {args.scores}")
        scores = saved
    else:
        scores = _scores_for(args, model, n_remove, tokenizer)
    result = prune_and_save(model, scores, n_remove, args.out, tokenizer, keep_first=args.keep_first,
                            keep_last=args.keep_last, ratio_requested=args.ratio,
                            model_name=_recorded_model(args.model), overwrite=args.overwrite,
                            save_dtype=args.save_dtype, source=_source(args))
    r = result.report
    print(json.dumps({"out": str(result.path), "removed_blocks": r["removed_blocks"], "num_blocks_after": r["num_blocks_after"],
                      "params_before": r["params_before"], "params_after": r["params_after"],
                      "ratio_actual": round(r["ratio_actual"], 4)}))
    return 0


def _width_target(args: argparse.Namespace) -> int | None:
    """The parameter count --params or --like asks for (None for --ratio, which needs the model); bad input fails
    here, before the model loads."""
    from shortened.pruning import PRUNING_JSON, check_ratio

    if args.ratio is not None:
        check_ratio(args.ratio)
        return None
    if args.params is not None:
        return args.params
    if not Path(args.like).is_dir():
        raise ShortenedError(f"--like {args.like}: no such folder")
    report = Path(args.like) / PRUNING_JSON
    if not report.is_file():
        raise ShortenedError(f"--like {args.like}: no {PRUNING_JSON} there (a folder written by `shortened prune`)")
    try:
        return int(json.loads(report.read_text())["params_after"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ShortenedError(f"{report}: cannot read params_after ({exc})") from exc


def cmd_prune_width(args: argparse.Namespace) -> int:
    from shortened.data.calibration import calibration_windows
    from shortened.io import check_output
    from shortened.models import count_params, load_model
    from shortened.width import plan_for_params, prune_width, save_width_pruned, width_scores

    check_output(args.out, kind="dir", overwrite=args.overwrite, flag="--out", create=False)
    target = _width_target(args)
    _source(args)
    calib_cfg = _calibration_config(args) if args.score == "activation" else None
    tokenizer = _tokenizer(args, "--score activation (calibration text)" if calib_cfg else None)
    check_output(args.out, kind="dir", overwrite=args.overwrite, flag="--out")
    model = load_model(_source(args), **_model_options(args))
    before = count_params(model)
    plan = plan_for_params(model, int(before * (1 - args.ratio)) if target is None else target, args.score)
    calibration = None
    if calib_cfg is not None:
        from shortened.models import check_positions

        check_positions(model, calib_cfg.seq_len, "--calib-seq-len")
        calibration = calibration_windows(tokenizer, calib_cfg)
    prune_width(model, plan, width_scores(model, args.score, calibration))
    out = save_width_pruned(model, plan, args.out, tokenizer, source=args.model, params_before=before,
                            overwrite=args.overwrite, dtype=io.resolve_save_dtype(args.save_dtype, _source(args)))
    after = count_params(model)
    print(json.dumps({"out": str(out), "groups_removed": plan.groups, "channels_removed": plan.channels,
                      "params_before": before, "params_after": after, "ratio_actual": round(1 - after / before, 4)}))
    return 0


def train_config(args: argparse.Namespace):
    """TrainConfig from --config YAML with flags on top; a clear error naming a bad field."""
    import yaml

    from shortened.training.config import TrainConfig

    fields: dict = {}
    if args.config:
        try:
            fields = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ShortenedError(f"--config {args.config}: {exc}") from exc
        if not isinstance(fields, dict):
            raise ShortenedError(f"--config {args.config}: expected a mapping of TrainConfig fields")
    flags = {"method": args.method, "train_tokens": args.train_tokens, "micro_batch_size": args.micro_batch_size,
             "grad_accum": args.grad_accum, "lr": args.lr, "zero_stage": args.zero_stage,
             "save_dtype": args.save_dtype, "attn_implementation": args.attn_implementation}
    fields.update({k: v for k, v in flags.items() if v is not None})
    data = dict(fields.get("data") or {})
    if args.data is not None:
        data["source"] = args.data
    if args.seq_len is not None:  # 0 is refused by the config's range, not replaced by the default
        data["seq_len"] = args.seq_len
    fields["data"] = data
    lora = fields.get("lora") or {}
    if args.lora_zero_stage is not None and isinstance(lora, dict):  # (a non-mapping is refused by validation)
        fields["lora"] = {**lora, "zero_stage": args.lora_zero_stage}
    return validated(TrainConfig, fields, f"retrain setting{f' ({args.config})' if args.config else ''}")


def cmd_retrain(args: argparse.Namespace) -> int:
    from shortened.io import check_output
    from shortened.training.retrain import ScaleConfig, retrain

    check_output(args.out, kind="dir", overwrite=args.overwrite, flag="--out")  # before 30 s of Ray start-up
    cfg = train_config(args)
    scale = ScaleConfig(num_workers=args.workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
                        placement_strategy=args.placement)
    result = retrain(args.model, args.out, cfg, scale=scale, storage_path=args.storage_path,
                     name=args.name or Path(args.out).name, max_failures=args.max_failures,
                     overwrite=args.overwrite, teacher=args.teacher, address=args.address)
    print(json.dumps({"out": result.model_dir, "metrics": result.metrics,
                      "phases": [{"phase": p["phase"], "run": p["run"], "checkpoint": p["checkpoint"]}
                                 for p in result.phases]}, indent=2, default=str))
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ShortenedError(f"{flag} takes comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise ShortenedError(f"{flag} needs integers >= 1, got {text!r}")
    return values


def cmd_eval(args: argparse.Namespace) -> int:
    from shortened.evaluation import EvalConfig, evaluate, metric_rows
    from shortened.io import check_output, write_json_atomic
    from shortened.models import load_model, load_tokenizer, resolve_source

    nothing_asked = args.ppl is None and not args.tasks and not args.speed
    ppl = "wikitext2,ptb" if nothing_asked else (args.ppl or "")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.tasks is not None and not tasks:
        raise ShortenedError(f"--tasks {args.tasks!r} names no task; give task names or 'all', or leave it out")
    ppl_sets = [d.strip() for d in ppl.split(",") if d.strip()]
    if not ppl_sets and not tasks and not args.speed:
        raise ShortenedError("nothing to evaluate: --ppl is empty and neither --tasks nor --speed is given")
    fields = dict(ppl=ppl_sets, ppl_protocol=args.ppl_protocol,
                  ppl_seq_len=args.ppl_seq_len, ppl_bos=args.ppl_bos, ppl_max_windows=args.ppl_windows,
                  tasks=tasks, tasks_source=args.tasks_source,
                  limit=args.limit, speed=args.speed,
                  speed_batch_sizes=_int_list(args.speed_batch_sizes, "--speed-batch-sizes"),
                  speed_new_tokens=_int_list(args.speed_new_tokens, "--speed-new-tokens"),
                  speed_repeats=args.speed_repeats, speed_warmup=args.speed_warmup,
                  batch_size=args.batch_size, zeroshot_batch_size=args.zeroshot_batch_size,
                  zeroshot_cache=args.zeroshot_cache, progress=not args.quiet)
    cfg = validated(EvalConfig, fields, "eval option")
    if args.baseline and not args.speed:
        raise ShortenedError("--baseline is compared by --speed; add --speed")
    for flag, given, applies, to in (("--limit", args.limit, tasks, "zero-shot tasks (--tasks)"),
                                     ("--zeroshot-cache", args.zeroshot_cache, tasks, "zero-shot tasks (--tasks)"),
                                     ("--zeroshot-batch-size", args.zeroshot_batch_size, tasks,
                                      "zero-shot tasks (--tasks)"),
                                     ("--ppl-windows", args.ppl_windows, ppl_sets, "perplexity (--ppl)"),
                                     ("--ppl-seq-len", args.ppl_seq_len, ppl_sets, "perplexity (--ppl)")):
        if given is not None and not applies:
            raise ShortenedError(f"{flag} would be ignored: it applies to {to}, and none is asked for")
    out = check_output(args.out, kind="file", overwrite=args.overwrite, flag="--out", create=False)
    if cfg.zeroshot_cache and cfg.tasks:
        check_output(cfg.zeroshot_cache, kind="folder", flag="--zeroshot-cache", create=False)
    _source(args)
    baseline_source = resolve_source(args.baseline, what="--baseline") if args.baseline else None
    tokenizer = _tokenizer(args, "evaluation (perplexity, zero-shot and speed read text)")
    baseline_tokenizer = None
    if baseline_source is not None:
        try:
            baseline_tokenizer = load_tokenizer(baseline_source)
        except ShortenedError as exc:
            if not args.tokenizer:
                raise ShortenedError(f"--baseline {args.baseline}: {exc}; pass --tokenizer PATH if the two models "
                                     "share it") from exc
            baseline_tokenizer = tokenizer
    check_output(out, kind="file", overwrite=args.overwrite, flag="--out")  # every check passed: create folders
    if cfg.zeroshot_cache and cfg.tasks:
        check_output(cfg.zeroshot_cache, kind="folder", flag="--zeroshot-cache")
    model = load_model(_source(args), **_model_options(args))
    baseline = None
    if baseline_source is not None:
        baseline = (load_model(baseline_source, **_model_options(args)), baseline_tokenizer)
    result = {"model": args.model, "baseline": args.baseline, **evaluate(model, tokenizer, cfg, baseline)}
    write_json_atomic(out, result)
    print("| metric | dataset/task | value | protocol |\n|---|---|---|---|")
    for r in metric_rows(result):
        print(f"| {r['name']} | {r['dataset']} | {r['value']:.4f} | {r['protocol']} |")
    weak = [t for t in result.get("zeroshot", {}).get("tasks", []) if not t["above_chance"]]
    if weak:
        print("\nnot above chance (within 2 standard errors of guessing, or below): " + ", ".join(
            f"{t['task']} {t['value']:.4f} (chance {t['chance']:.2f}, {t['items']} items)" for t in weak))
    if "speed" in result:
        from shortened.evaluation.speed import speed_table

        print("\n" + speed_table(result["speed"]))
    print(f"\nwrote {out}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    import time
    from collections import Counter

    from shortened.data import DataConfig, DocumentStream
    from shortened.data.formats import encode
    from shortened.data.stream import set_name

    from shortened.data.calibration import alias_split_error
    from shortened.data.sources import is_hub

    split = args.split or "train"
    if args.gguf_file and not args.tokenizer:
        raise ShortenedError(f"--gguf-file {args.gguf_file!r} names a file in the --tokenizer folder; add --tokenizer")
    error = alias_split_error(args.source, split)
    if error:
        raise ShortenedError(f"--{error}")
    if args.split and not is_hub(args.source) and args.source != "slimpajama-sample":
        raise ShortenedError(f"--split {args.split!r}: {args.source!r} is a path, which has no splits (--split "
                             "applies to slimpajama-sample and hf:NAME); name the split's own folder or file")
    cfg = validated(DataConfig, dict(source=args.source, split=split, format=args.format,
                                     text_field=args.text_field, mixture=args.mixture, epochs=1,
                                     max_bad_fraction=args.max_bad_fraction), "data option")
    tokenizer = None
    if args.tokenizer:
        from shortened.models import load_tokenizer

        from shortened.models import resolve_source

        tokenizer = load_tokenizer(resolve_source(args.tokenizer, args.gguf_file, what="--tokenizer"))
    start = time.perf_counter()
    streams = [DocumentStream(cfg, r, args.world_size) for r in range(args.world_size)]
    per_rank, sets, tokens = [], Counter(), 0
    for stream in streams:
        n = 0
        for doc in stream:
            n += 1
            sets[str(set_name(doc.record, cfg.mixture_field))] += 1
            if tokenizer is not None:
                tokens += len(encode(doc.record, cfg, tokenizer)[0])
        per_rank.append(n)
    first = streams[0]
    # every rank reads every line under a document split; each reads its own shards otherwise
    counted = [first] if first.split_mode == "document" else streams
    report = {"source": args.source, "resolved": first.source, "split_mode": first.split_mode,
              "shards": len(first.shards.paths) if first.shards else None, "documents": sum(per_rank),
              "documents_per_rank": per_rank, "sets": dict(sets.most_common()),
              "lines": sum(s.bad.lines for s in counted), "bad_lines": sum(s.bad.bad for s in counted),
              "bad_examples": [e for s in counted for e in s.bad.examples][:3],
              "tokens": tokens if tokenizer is not None else None,
              "seconds": round(time.perf_counter() - start, 2)}
    print(json.dumps(report, indent=2))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from shortened.sweep import load_sweep_config
    from shortened.sweep.report import markdown_table, trial_table
    from shortened.sweep.runner import run_sweep

    cfg = load_sweep_config(args.config, {"name": args.name, "storage_path": args.storage_path,
                                          "store_url": args.store})
    outcome = run_sweep(cfg, resume=args.resume, address=args.address)
    print(markdown_table(*trial_table(outcome.trials)))
    _print_choice(outcome.choice)
    print(f"\nexperiment {outcome.experiment_dir} ({len(outcome.ran)} trial(s) run now, "
          f"{outcome.seconds / 60:.1f} min); store {outcome.store_url}")
    return 0


def _print_choice(choice) -> None:
    if choice.chosen:
        print(f"\nselected: {choice.chosen['key']} (policy {choice.policy}, metric {choice.metric})\n  why: "
              f"{choice.reason}\n  model: {choice.chosen['model_path']}")
    else:
        print(f"\nselected: nothing (policy {choice.policy}, metric {choice.metric})\n  why: {choice.reason}")


def cmd_results(args: argparse.Namespace) -> int:
    import csv

    from shortened.sweep.report import markdown_table, trial_table

    store, name, _ = open_experiment_args(args)
    trials = store.trials(name)
    if args.format == "json":
        print(json.dumps(trials, indent=2, default=str))
    elif args.format == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(["trial", "status", "criterion", "method", "ratio", "ratio_actual", "num_blocks", "params",
                    "tokens_trained", "metric", "dataset", "protocol", "value"])
        for t in trials:
            for m in t["metrics"] or [{"name": "", "dataset": "", "protocol": "", "value": ""}]:
                w.writerow([t["key"], t["status"], t["criterion"], t["method"], t["ratio"], t["ratio_actual"],
                            t["num_blocks"], t["params"], t["tokens_trained"], m["name"], m["dataset"],
                            m["protocol"], m["value"]])
    else:
        print(markdown_table(*trial_table(trials)))
    return 0


def _selection(args: argparse.Namespace, store, name: str):
    from shortened.sweep.config import Selection

    saved = store.experiment(name)["config"].get("selection", {})
    flags = {"policy": getattr(args, "policy", None), "metric": getattr(args, "metric", None),
             "tolerance_pct": getattr(args, "tolerance", None), "max_params": getattr(args, "max_params", None),
             "max_latency_s": getattr(args, "max_latency", None)}
    return validated(Selection, {**saved, **{k: v for k, v in flags.items() if v is not None}}, "selection option")


def cmd_select(args: argparse.Namespace) -> int:
    from shortened.sweep.selection import select

    store, name, _ = open_experiment_args(args)
    choice = select(store.trials(name), _selection(args, store, name), strict=True)
    print("| trial | ratio | value | meets policy |\n|---|---|---|---|")
    for c in choice.candidates:
        print(f"| {c['key']} | {c['ratio']:.3f} | {c['value']:.4g} | {'yes' if c.get('ok') else 'no'} |")
    if choice.baseline is not None:
        print(f"| dense | 0.000 | {choice.baseline:.4g} | baseline |")
    _print_choice(choice)
    return 0 if choice.chosen else 1


def open_experiment_args(args: argparse.Namespace):
    from shortened.sweep.report import open_experiment

    return open_experiment(args.experiment, args.store, args.storage_path)


def cmd_report(args: argparse.Namespace) -> int:
    from shortened.sweep.report import write_report
    from shortened.sweep.selection import select

    from shortened.io import check_output

    store, name, exp_dir = open_experiment_args(args)
    if args.out is None and exp_dir is None:
        raise ShortenedError(f"experiment {name!r} has no folder on record; pass --out FOLDER")
    out_dir = args.out or (exp_dir / "report")
    check_output(out_dir, kind="folder", overwrite=True, flag="--out" if args.out else "report folder", create=False)
    choice = select(store.trials(name), _selection(args, store, name), strict=True)
    check_output(out_dir, kind="folder", overwrite=True, flag="--out" if args.out else "report folder")
    out = write_report(store, name, out_dir, choice, args.format)
    print(f"wrote {out}")
    return 0


def _quiet_stdout() -> None:
    """After a closed pipe (``shortened results | head``): point stdout at /dev/null so the interpreter's final
    flush does not print a second BrokenPipeError."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb. Exit codes: 0 done, 1 nothing chosen (``select``), 2 bad input (one line: ``shortened VERB:
    error: MESSAGE``, also argparse's for a bad flag), 130 interrupted (Ctrl-C: one line, no traceback; the
    atomic writes leave nothing half-written), 141 output pipe closed (quietly)."""
    command = "shortened"
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, its message already printed)
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        command = f"shortened {args.command}"
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        try:
            code = args.func(args)
            sys.stdout.flush()  # a closed pipe shows here, inside the handlers, not in the interpreter's exit
            if code == 0:
                io.CREATED.clear()
            return code
        except ShortenedError as exc:
            if isinstance(exc, Interrupted):  # Ctrl-C or a stop: the message says how to resume
                print(f"{command}: interrupted: {exc}", file=sys.stderr)
                return 130
            print(f"{command}: error: {exc}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print(f"\n{command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    finally:
        io.remove_created_if_empty()  # after a success the list is empty: nothing to remove


if __name__ == "__main__":
    sys.exit(main())
