"""Bad input tried as a new user would, on every verb (issue 16, "trust"): numeric ranges, output locations
checked before the work, missing local paths, model folders without a tokenizer, interruptions and closed pipes,
file modes under the umask, unknown selection metrics. Each error must name the flag, file or value, come before
the work starts (the loader is never called), and leave nothing behind."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest

from shortened.cli import main
from shortened.errors import ShortenedError


def run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model is loaded or training starts: every check here must come before that."""
    import shortened.models

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(shortened.models, "load_model", boom)
    return boom


@pytest.fixture(scope="module")
def no_tokenizer_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny Llama saved as a trainer saves it: weights and config, no tokenizer files."""
    from tiny_models import tiny_model

    out = tmp_path_factory.mktemp("no-tokenizer")
    tiny_model("llama", vocab_size=len(smollm2_tokenizer)).save_pretrained(out)
    assert not any(p.name.startswith("tokenizer") for p in out.iterdir())
    return out


# -- every numeric option has a range, checked by argparse (exit 2, the flag and value named) --------------------

M = ["--model", "m"]
SCORE = ["score", *M, "--criterion", "ppl", "--out", "s.json"]
PRUNE = ["prune", *M, "--criterion", "ppl", "--out", "o"]
WIDTH = ["prune-width", *M, "--out", "o"]
RETRAIN = ["retrain", *M, "--train-tokens", "8", "--out", "o"]
EVAL = ["eval", *M, "--out", "r.json"]
DATA = ["data", "slimpajama-sample"]


@pytest.mark.parametrize("argv, flag, value", [
    (SCORE, "--calib-samples", "-3"), (SCORE, "--calib-samples", "0"), (SCORE, "--calib-seq-len", "1"),
    (SCORE, "--seed", "-1"), (SCORE, "--batch-size", "0"), (SCORE, "--keep-first", "-1"),
    (SCORE, "--keep-last", "-2"), (SCORE, "--blocks", "-1"), (SCORE, "--calib-samples", "2.5"),
    ([*PRUNE[:-2], "--blocks", "1", "--out", "o"], "--calib-seq-len", "0"),
    (PRUNE, "--ratio", "1.5"), (PRUNE, "--ratio", "-0.1"), (PRUNE, "--ratio", "nan"), (PRUNE, "--ratio", "1"),
    (WIDTH, "--ratio", "inf"), (WIDTH, "--params", "0"), (WIDTH, "--calib-samples", "-3"), (WIDTH, "--seed", "-5"),
    (RETRAIN, "--train-tokens", "-5"), (RETRAIN, "--seq-len", "1"), (RETRAIN, "--micro-batch-size", "0"),
    (RETRAIN, "--grad-accum", "0"), (RETRAIN, "--lr", "0"), (RETRAIN, "--lr", "nan"), (RETRAIN, "--workers", "0"),
    (RETRAIN, "--cpus-per-worker", "-1"), (RETRAIN, "--max-failures", "-1"),
    (EVAL, "--ppl-seq-len", "1"), (EVAL, "--ppl-windows", "0"), (EVAL, "--limit", "0"),
    (EVAL, "--speed-repeats", "0"), (EVAL, "--speed-warmup", "-1"), (EVAL, "--batch-size", "-8"),
    (DATA, "--world-size", "0"), (DATA, "--max-bad-fraction", "1.5"), (DATA, "--mixture", '{"RedPajamaC4": -1}'),
    (DATA, "--mixture", "[1]"),
    (["select", "runs/x"], "--tolerance", "-1"), (["select", "runs/x"], "--max-params", "0"),
    (["select", "runs/x"], "--max-latency", "0"),
])
def test_every_numeric_option_has_a_range(no_loading, tmp_path, monkeypatch, capsys, argv, flag, value):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, flag, value]) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and value in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_ranges_accept_their_edges():
    from shortened.cli import build_parser

    parse = build_parser().parse_args
    for ratio in ("0", "0.999"):
        assert parse([*PRUNE, "--ratio", ratio]).ratio == float(ratio)
    for fraction in ("0", "1"):
        assert parse([*DATA, "--max-bad-fraction", fraction]).data.max_bad_fraction == float(fraction)
    assert parse([*SCORE, "--keep-first", "0"]).keep_first == 0
    assert parse([*SCORE, "--calib-seq-len", "2"]).calibration.seq_len == 2


def test_calibration_config_ranges_and_unknown_fields():
    from pydantic import ValidationError

    from shortened.data.calibration import CalibrationConfig
    from shortened.errors import validated

    for bad in ({"n_sample": 5}, {"n_samples": 0}, {"seq_len": 1}, {"seed": -1}, {"pool_factor": 0},
                {"mixture": {"RedPajamaC4": -1}}, {"split": "valdation"}):
        with pytest.raises(ValidationError):
            CalibrationConfig(**bad)
    with pytest.raises(ShortenedError, match=r"bad calibration n_sample: Extra inputs are not permitted"):
        validated(CalibrationConfig, {"n_sample": 5}, "calibration")
    with pytest.raises(ShortenedError, match="split 'valdation': the offline slimpajama-sample has train, validation"):
        validated(CalibrationConfig, {"split": "valdation"}, "calibration")
    assert CalibrationConfig(split="validation").split == "validation"


def test_every_config_model_refuses_unknown_fields():
    """A misspelt field (``calibration: {n_sample: 5}``) is an error in every pydantic model of shortened, never a
    setting silently dropped."""
    import importlib
    import inspect
    import pkgutil

    from pydantic import BaseModel

    import shortened

    models = {c for info in pkgutil.walk_packages(shortened.__path__, "shortened.")
              for c in vars(importlib.import_module(info.name)).values()
              if inspect.isclass(c) and issubclass(c, BaseModel) and c.__module__.startswith("shortened.")}
    assert {"CalibrationConfig", "DataConfig", "TrainConfig", "SweepConfig", "EvalConfig"} <= {c.__name__ for c in models}
    assert [c.__name__ for c in models if c.model_config.get("extra") != "forbid"] == []


def test_sweep_yaml_refuses_a_misspelt_calibration_field(tmp_path):
    from shortened.sweep import load_sweep_config

    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: x\nmodel: smollm2\ncriteria: [ppl]\nratios: [0.2]\ncalibration: {n_sample: 5}\n")
    with pytest.raises(ShortenedError, match="calibration.n_sample"):
        load_sweep_config(str(cfg))


@pytest.mark.parametrize("argv, message", [
    (["eval", "--ppl", "", "--out", "r.json"], "nothing to evaluate: --ppl is empty"),
    (["eval", "--tasks", ",", "--out", "r.json"], "--tasks ',' names no task"),
    (["score", "--criterion", "ppl", "--calib-source", "./no-corpus/", "--out", "s.json"],
     "--calib-source: data source './no-corpus/' does not exist"),
    (["prune-width", "--ratio", "0.1", "--calib-source", "none-*.jsonl", "--out", "o"],
     "--calib-source: data source 'none-*.jsonl': the glob matches no file"),
])
def test_options_that_would_be_dropped_or_fail_late_are_refused_first(no_loading, tiny_llama_dir, tmp_path,
                                                                       monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main([argv[0], "--model", str(tiny_llama_dir), *argv[1:]]) == 2
    assert message in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_data_gguf_file_without_tokenizer_is_refused(capsys):
    assert main(["data", "slimpajama-sample", "--gguf-file", "x.gguf"]) == 2
    assert "--gguf-file 'x.gguf' names a file in the --tokenizer folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["eval", "--ppl", "ptb", "--ppl-seq-len", "300"], "--ppl-seq-len: 300 tokens per sequence, but the model "
                                                       "handles at most 256"),
    (["eval", "--ppl", "ptb", "--ppl-protocol", "gptq"], "--ppl-protocol gptq (2048-token windows): 2048 tokens"),
    (["eval", "--speed", "--speed-new-tokens", "4,300"], "--speed-new-tokens 300 (after the"),
    (["score", "--criterion", "ppl", "--calib-seq-len", "257"], "--calib-seq-len: 257 tokens per sequence"),
])
def test_lengths_beyond_the_model_positions_fail_before_any_forward(tiny_llama_dir, tmp_path, capsys, argv,
                                                                     message):
    out = tmp_path / "o.json"
    assert run(argv[0], "--model", tiny_llama_dir, *argv[1:], "--quiet", "--out", out) == 2
    assert message in capsys.readouterr().err and not out.exists()


# -- a mistyped split or a missing local path is named, never a silent switch to the hub ----------------------------

def test_data_split_typo_is_refused_not_streamed_from_the_hub(capsys, tmp_path):
    assert main(["data", "slimpajama-sample", "--split", "valdation"]) == 2
    err = capsys.readouterr().err
    assert "--split 'valdation'" in err and "train, validation" in err
    (tmp_path / "a.txt").write_text("hello\n")
    assert main(["data", str(tmp_path / "a.txt"), "--split", "test"]) == 2
    assert "--split 'test'" in capsys.readouterr().err


@pytest.mark.parametrize("spec, kind", [("nope/", "folder"), ("./nope", "folder"), ("../nope", "folder"),
                                        ("~/surely-not-here-xyz", "folder"), ("a/b/c", "folder"),
                                        ("model.json", "file"), ("weights.gguf", "file"), ("/no/such/dir", "folder")])
def test_missing_local_paths_are_no_such_folder_not_hub_errors(spec, kind):
    from shortened.models import resolve_source

    with pytest.raises(ShortenedError, match=f"--model: no such {kind} '{spec}'"):
        resolve_source(spec, what="--model")


def test_hub_ids_still_resolve_to_the_hub():
    from shortened.models import ModelSource, resolve_source

    for hub in ("HuggingFaceTB/SmolLM2-135M", "Qwen/Qwen2.5-0.5B", "gpt2"):
        assert resolve_source(hub) == ModelSource(hub)


@pytest.mark.parametrize("argv", [
    ["score", "--criterion", "magnitude", "--out", "s.json"],
    ["prune", "--criterion", "magnitude", "--blocks", "1", "--out", "o"],
    ["prune-width", "--ratio", "0.2", "--out", "o"],
    ["eval", "--ppl", "wikitext2", "--out", "r.json"],
])
def test_every_verb_names_a_missing_model_folder(no_loading, tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    assert main([argv[0], "--model", "nope/", *argv[1:]]) == 2
    assert capsys.readouterr().err.strip() == f"shortened {argv[0]}: error: --model: no such folder 'nope/'"
    assert list(tmp_path.iterdir()) == []


def test_eval_names_a_missing_baseline(no_loading, tiny_llama_dir, tmp_path, capsys):
    assert run("eval", "--model", tiny_llama_dir, "--speed", "--baseline", "./dense/", "--out", tmp_path / "r.json") == 2
    assert "--baseline: no such folder './dense/'" in capsys.readouterr().err


# -- outputs are checked (and created) before the work --------------------------------------------------------------

@pytest.fixture
def a_file(tmp_path):
    f = tmp_path / "taken"
    f.write_text("not a folder")
    return f


@pytest.mark.parametrize("verb, argv, out", [
    ("score", ["--criterion", "magnitude"], "x/s.json"),
    ("prune", ["--criterion", "magnitude", "--blocks", "1"], "x/pruned"),
    ("prune-width", ["--ratio", "0.2", "--score", "magnitude"], "pruned"),
    ("eval", ["--ppl", "wikitext2"], "deep/r.json"),
])
def test_an_out_below_a_file_fails_before_loading(no_loading, tiny_llama_dir, a_file, capsys, verb, argv, out):
    assert run(verb, "--model", tiny_llama_dir, *argv, "--out", a_file / out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"shortened {verb}: error: --out {a_file / out}: {a_file} is a file, not a folder")
    assert len(err.splitlines()) == 1 and a_file.read_text() == "not a folder"


def test_retrain_checks_its_out_before_ray_starts(monkeypatch, tiny_llama_dir, a_file, capsys):
    import shortened.training.retrain as rt

    monkeypatch.setattr(rt, "retrain", lambda *a, **k: pytest.fail("retrain started before --out was checked"))
    assert run("retrain", "--model", tiny_llama_dir, "--train-tokens", 8, "--out", a_file / "healed") == 2
    assert f"--out {a_file / 'healed'}: {a_file} is a file" in capsys.readouterr().err


def test_report_checks_its_out_before_selecting(monkeypatch, a_file, capsys):
    import shortened.cli as cli

    monkeypatch.setattr(cli, "open_experiment_args", lambda args: (FakeStore(TRIALS), "exp", a_file.parent))
    assert run("report", "exp", "--out", a_file / "report") == 2
    assert f"--out {a_file / 'report'}: {a_file} is a file" in capsys.readouterr().err


def test_an_unwritable_out_fails_before_loading(no_loading, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import shortened.io

    def denied(folder):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(shortened.io, "_probe_writable", denied)  # root (this sandbox) writes anywhere
    assert run("eval", "--model", tiny_llama_dir, "--out", tmp_path / "ro" / "r.json") == 2
    assert f"--out {tmp_path / 'ro' / 'r.json'}: cannot write in {tmp_path} (Permission denied)" in \
        capsys.readouterr().err
    assert not (tmp_path / "ro").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0555 folder")
def test_a_read_only_folder_is_refused(no_loading, tiny_llama_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert run("prune", "--model", tiny_llama_dir, "--criterion", "magnitude", "--blocks", "1",
                   "--out", ro / "p") == 2
        assert "cannot write in" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


def test_check_output_kinds(tmp_path):
    from shortened.io import check_output

    (tmp_path / "f.json").write_text("{}")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ShortenedError, match="--out .*f.json: the file exists"):
        check_output(tmp_path / "f.json", kind="file", flag="--out")
    with pytest.raises(ShortenedError, match="is a folder, expected a file path"):
        check_output(tmp_path / "full", kind="file", overwrite=True)
    with pytest.raises(ShortenedError, match="exists and is not a folder"):
        check_output(tmp_path / "f.json", kind="dir", overwrite=True)
    with pytest.raises(ShortenedError, match="exists and is not empty"):
        check_output(tmp_path / "full", kind="dir")
    assert check_output(tmp_path / "full", kind="folder") == tmp_path / "full"  # a report folder may hold files
    deep = tmp_path / "a" / "b" / "m"
    assert check_output(deep, kind="dir", create=False) == deep and not (tmp_path / "a").exists()
    check_output(deep, kind="dir")
    assert (tmp_path / "a" / "b").is_dir() and not deep.exists()  # the model folder itself appears when complete
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == []  # the write probe leaves nothing


# -- model folders without a tokenizer --------------------------------------------------------------------------------

def test_magnitude_prunes_a_folder_without_tokenizer_with_a_warning(no_tokenizer_dir, tmp_path, caplog):
    out = tmp_path / "pruned"
    with caplog.at_level("WARNING"):
        assert run("prune", "--model", no_tokenizer_dir, "--criterion", "magnitude", "--blocks", "2",
                   "--out", out) == 0
    assert "no usable tokenizer" in caplog.text and "--tokenizer" in caplog.text
    assert (out / "config.json").is_file() and (out / "pruning.json").is_file()
    assert not any(p.name.startswith(("tokenizer", "special_tokens")) for p in out.iterdir())
    width = tmp_path / "width"
    assert run("prune-width", "--model", no_tokenizer_dir, "--ratio", "0.01", "--score", "magnitude",
               "--out", width) == 0
    assert (width / "width_pruning.json").is_file()


@pytest.mark.parametrize("argv, needs", [
    (["prune", "--criterion", "ppl", "--blocks", "1"], "criterion 'ppl'"),
    (["score", "--criterion", "taylor"], "criterion 'taylor'"),
    (["prune-width", "--ratio", "0.2"], "--score activation"),
    (["eval", "--ppl", "wikitext2"], "evaluation"),
])
def test_text_criteria_say_they_need_a_tokenizer(no_loading, no_tokenizer_dir, tmp_path, capsys, argv, needs):
    out = tmp_path / ("o.json" if argv[0] in ("score", "eval") else "o")
    assert run(argv[0], "--model", no_tokenizer_dir, *argv[1:], "--out", out) == 2
    err = capsys.readouterr().err
    assert needs in err and "pass --tokenizer PATH" in err and not out.exists()


def test_tokenizer_flag_supplies_the_calibration_text(no_tokenizer_dir, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert run("prune", "--model", no_tokenizer_dir, "--tokenizer", tiny_llama_dir, "--criterion", "ppl",
               "--blocks", "1", "--calib-samples", "2", "--calib-seq-len", "16", "--quiet", "--out", out) == 0
    assert (out / "tokenizer.json").is_file()  # the tokenizer it was given goes with the model
    assert run("eval", "--model", no_tokenizer_dir, "--tokenizer", tiny_llama_dir, "--ppl", "ptb", "--ppl-windows",
               "1", "--quiet", "--out", tmp_path / "r.json") == 0
    assert json.loads((tmp_path / "r.json").read_text())["ppl"][0]["windows_evaluated"] == 1
    capsys.readouterr()
    assert run("score", "--model", no_tokenizer_dir, "--tokenizer", "./no-tok/", "--criterion", "ppl",
               "--out", tmp_path / "s.json") == 2
    assert "--tokenizer: no such folder './no-tok/'" in capsys.readouterr().err


# -- interruptions, closed pipes, one-line errors ---------------------------------------------------------------------

VERB_ARGS = {"score": SCORE, "prune": [*PRUNE, "--blocks", "1"], "prune-width": [*WIDTH, "--ratio", "0.2"],
             "retrain": RETRAIN, "eval": EVAL, "data": DATA, "sweep": ["sweep", "c.yaml"],
             "results": ["results", "x"], "select": ["select", "x"], "report": ["report", "x"]}


@pytest.mark.parametrize("verb", list(VERB_ARGS))
def test_ctrl_c_in_any_verb_exits_130_with_one_line(monkeypatch, capsys, verb):
    import shortened.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, f"cmd_{verb.replace('-', '_')}", interrupted)
    assert main(VERB_ARGS[verb]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == f"shortened {verb}: interrupted" and "Traceback" not in captured.out


@pytest.mark.parametrize("verb", ["results", "eval"])
def test_one_line_for_a_shortened_error_and_quiet_for_a_closed_pipe(monkeypatch, capsys, verb):
    import shortened.cli as cli

    name = f"cmd_{verb}"
    monkeypatch.setattr(cli, name, lambda args: (_ for _ in ()).throw(ShortenedError("what went wrong")))
    assert main(VERB_ARGS[verb]) == 2
    assert capsys.readouterr().err == f"shortened {verb}: error: what went wrong\n"
    monkeypatch.setattr(cli, name, lambda args: (_ for _ in ()).throw(BrokenPipeError(32, "Broken pipe")))
    monkeypatch.setattr(cli, "_quiet_stdout", lambda: None)  # the real one points fd 1 at /dev/null
    assert main(VERB_ARGS[verb]) == 141
    assert capsys.readouterr().err == ""


def test_ctrl_c_while_saving_leaves_no_half_written_folder(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import shortened.io

    def interrupted(staging, final):
        assert (staging / "pruning.json").is_file()  # complete, but not yet in place
        raise KeyboardInterrupt

    monkeypatch.setattr(shortened.io, "publish_dir", interrupted)
    assert run("prune", "--model", tiny_llama_dir, "--criterion", "magnitude", "--blocks", "1",
               "--out", tmp_path / "pruned") == 130
    err = capsys.readouterr().err  # progress bars, then one line
    assert err.strip().splitlines()[-1] == "shortened prune: interrupted" and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging copy


def test_folders_and_files_are_written_one_way(tmp_path):
    """io.staged_dir is how a folder is written (model folders, materialize, the retrained export): published whole
    when its block ends, removed when it raises; io.write_text_atomic is how a file is (parents=False: a missing
    folder is an error, as for open)."""
    from shortened.io import staged_dir, write_text_atomic

    out = tmp_path / "f"
    with staged_dir(out) as staging:
        (staging / "a").write_text("1")
        assert not out.exists()
    assert (out / "a").read_text() == "1"
    with pytest.raises(RuntimeError), staged_dir(out) as staging:
        (staging / "a").write_text("2")
        raise RuntimeError("fails half way")
    assert (out / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["f"]
    with staged_dir(out) as staging:
        (staging / "b").write_text("3")
    assert [p.name for p in out.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["f"]
    with pytest.raises(FileNotFoundError):
        write_text_atomic(tmp_path / "missing" / "x", "1", parents=False)
    assert not (tmp_path / "missing").exists()
    write_text_atomic(tmp_path / "made" / "x", "1")
    assert (tmp_path / "made" / "x").read_text() == "1"


def test_a_closed_pipe_ends_quietly_in_a_real_process(tmp_path):
    import subprocess

    code = ("import shortened.cli as c, sys\n"
            "def spam(args):\n    for i in range(100000): print('row', i)\n    return 0\n"
            "c.cmd_results = spam\nsys.exit(c.main(['results', 'x']))\n")
    proc = subprocess.run(f"{sys.executable} -c \"{code}\" | head -n 2", shell=True, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout == "row 0\nrow 1\n" and proc.stderr == ""


# -- files readable by the team: the umask decides the modes ----------------------------------------------------------

@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600),
                                                       (0o002, 0o775, 0o664)])
def test_outputs_follow_the_umask(umask, tmp_path, mask, dir_mode, file_mode):
    from shortened.io import save_model_dir, write_json_atomic
    from tiny_models import tiny_model

    umask(mask)
    write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == file_mode
    out = save_model_dir(tmp_path / "m", tiny_model("llama"), report_name="pruning.json", report={"a": 1})
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    assert stat.S_IMODE((out / "pruning.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == file_mode
    # every file, the weights too (safetensors writes through mkstemp: 0600 whatever the umask)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {p.name: file_mode for p in out.iterdir()}


def test_cli_outputs_are_readable_by_the_team(umask, tiny_llama_dir, tmp_path):
    umask(0o022)
    assert run("score", "--model", tiny_llama_dir, "--criterion", "magnitude", "--out", tmp_path / "s" / "s.json") == 0
    assert stat.S_IMODE((tmp_path / "s" / "s.json").stat().st_mode) == 0o644
    assert run("prune", "--model", tiny_llama_dir, "--criterion", "magnitude", "--blocks", "1",
               "--out", tmp_path / "p") == 0
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "p").iterdir()} == {
        p.name: 0o644 for p in (tmp_path / "p").iterdir()}


# -- selection: an unknown metric is named with the ones the experiment has -------------------------------------------

def _trial(key, ratio, ppl, acc):
    return {"key": key, "ratio_actual": ratio, "status": "completed", "params": 10, "method": "cpt",
            "criterion": "ppl", "removed_blocks": [], "model_path": f"/m/{key}",
            "metrics": [{"name": "ppl", "dataset": "wikitext2", "value": ppl, "protocol": "paper-128"},
                        {"name": "zeroshot_mean", "dataset": "piqa+arc_easy", "value": acc, "protocol": "lm-eval"}]}


TRIALS = [_trial("dense", 0.0, 10.0, 0.6), _trial("a", 0.2, 12.0, 0.55)]


class FakeStore:
    url = "sqlite://"

    def __init__(self, trials):
        self._trials = trials

    def trials(self, name):
        return self._trials

    def experiment(self, name):
        return {"config": {"selection": {"metric": "ppl:wikitext2"}}, "status": "completed"}


def test_select_names_an_unknown_metric_and_lists_the_known(monkeypatch, capsys):
    import shortened.cli as cli
    from shortened.sweep.config import Selection
    from shortened.sweep.selection import select

    with pytest.raises(ShortenedError) as exc:
        select(TRIALS, Selection(metric="ppl:wikitext"), strict=True)
    assert str(exc.value) == ("unknown metric 'ppl:wikitext': the experiment has ppl, ppl:wikitext2, zeroshot_mean, "
                              "zeroshot_mean:piqa+arc_easy")
    lenient = select(TRIALS, Selection(metric="acc:piqa"))  # the end of a sweep: say so, do not raise
    assert lenient.chosen is None and lenient.reason.startswith("unknown metric 'acc:piqa'")
    assert select(TRIALS, Selection(metric="zeroshot_mean", tolerance_pct=10), strict=True).chosen["key"] == "a"
    monkeypatch.setattr(cli, "open_experiment_args", lambda args: (FakeStore(TRIALS), "exp", None))
    assert main(["select", "exp", "--metric", "ppl:wiki"]) == 2
    assert capsys.readouterr().err == ("shortened select: error: unknown metric 'ppl:wiki': the experiment has ppl, "
                                       "ppl:wikitext2, zeroshot_mean, zeroshot_mean:piqa+arc_easy\n")


def test_a_bad_flag_is_one_line(capsys):
    assert main(["prune", "--model", "m", "--criterion", "magnitude", "--ratio", "2", "--out", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["shortened prune: error: argument --ratio: ratio 2 must be in [0, 1) (a number, the fraction of "
                   "parameters removed) (see shortened prune --help)"]


def test_a_refused_command_removes_the_folders_it_made_for_its_output(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "pruned"
    # refused after the output was checked (the keep rule needs the model): the folders made for --out go again
    assert main(["prune", "--model", str(tiny_llama_dir), "--criterion", "magnitude", "--blocks", "7",
                 "--out", str(out), "--quiet"]) == 2
    assert "removes more than the 2 blocks" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a folder that existed before stays
    assert main(["prune", "--model", str(tiny_llama_dir), "--criterion", "magnitude", "--blocks", "7",
                 "--out", str(tmp_path / "kept" / "a" / "p"), "--quiet"]) == 2
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())
    assert main(["prune", "--model", str(tiny_llama_dir), "--criterion", "magnitude", "--blocks", "1",
                 "--out", str(out), "--quiet"]) == 0
    assert (out / "pruning.json").is_file()


def test_records_name_a_local_model_by_its_absolute_path(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tiny_llama_dir.parent)
    assert main(["prune", "--model", tiny_llama_dir.name, "--criterion", "magnitude", "--blocks", "1",
                 "--out", str(tmp_path / "p"), "--quiet"]) == 0
    assert json.loads((tmp_path / "p" / "pruning.json").read_text())["model"] == str(tiny_llama_dir.resolve())


@pytest.mark.parametrize("verb", ["select", "results", "report"])
def test_reading_verbs_never_create_a_results_database(verb, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([verb, "demo", "--store", "sqlite:///nope/x.db"]) == 2
    assert "no such results database 'nope/x.db'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_file_output_given_as_a_folder_path_is_refused(tmp_path, capsys):
    from shortened.io import check_output

    with pytest.raises(ShortenedError, match="ends with a slash"):
        check_output(f"{tmp_path}/sub/", kind="file", flag="--out")
    assert not (tmp_path / "sub").exists()
