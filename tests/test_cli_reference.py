"""One set of names from YAML to flags to Python (issue 18): every verb's flags are its models' fields, each with
its docstring as help, its default and whether it is required; the old spellings still work for a release, with a
note; and the README's configuration reference is what the models generate."""

from __future__ import annotations

from pathlib import Path

import pytest

from shortened.cli import VERBS, build_parser, main
from shortened.config_reference import config_models, reference, section

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_reference_is_generated_from_the_models():
    """Edit a field's docstring, then run `python -m shortened.config_reference --update README.md`."""
    assert section(README.read_text()) == reference()


def test_every_config_field_and_every_flag_has_help():
    for model in config_models():
        assert [name for name, info in model.model_fields.items() if not info.description] == [], model
    parser = build_parser()
    for verb in VERBS:
        undocumented = [a.dest for a in parser.verbs[verb.name]._actions if not a.help]
        assert undocumented == [], verb.name


def test_help_shows_docs_defaults_and_required(capsys):
    assert main(["retrain", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: shortened retrain --model MODEL --out OUT --train_tokens TRAIN_TOKENS [options]")
    assert "--train_tokens TRAIN_TOKENS Token budget across all workers. (required; an integer >= 1)" in out
    assert "--lora.zero_stage {0,1,2,3} The LoRA phase's DeepSpeed ZeRO stage" in out
    assert "(default: 2; one of 0, 1, 2, 3; formerly --lora-zero-stage)" in out
    assert "--num_workers NUM_WORKERS Ray Train workers (one process each; the world size). (default: 2; an integer " \
           ">= 1; formerly --workers)" in out


def test_flags_are_the_field_names_in_either_spelling():
    parse = build_parser().parse_args
    one = parse(["retrain", "--model", "m", "--out", "o", "--train_tokens", "64", "--lora.zero_stage", "0",
                 "--data.seq_len", "32", "--num_workers", "3", "--use_gpu", "--betas", "0.8,0.9"])
    two = parse(["retrain", "--model", "m", "--out", "o", "--train-tokens=64", "--lora.zero-stage", "0",
                 "--data.seq-len", "32", "--num-workers", "3", "--use-gpu", "true", "--betas", "[0.8, 0.9]"])
    for args in (one, two):
        assert (args.train.train_tokens, args.train.lora.zero_stage, args.train.data.seq_len) == (64, 0, 32)
        assert (args.scale.num_workers, args.scale.use_gpu, args.train.betas) == (3, True, (0.8, 0.9))
    ev = parse(["eval", "--model", "m", "--out", "r.json", "--ppl", "wikitext2,c4", "--speed", "false",
                "--speed_batch_sizes", "1,4"])
    assert (ev.eval.ppl, ev.eval.speed, ev.eval.speed_batch_sizes) == (["wikitext2", "c4"], False, [1, 4])


# the flags of the previous release: each still works, with a note naming its new spelling
OLD = [
    (["score", "--model", "m", "--criterion", "ppl", "--out", "s.json"], "--calib-samples", "3",
     "--calibration.n_samples", lambda a: a.calibration.n_samples == 3),
    (["prune", "--model", "m", "--criterion", "ppl", "--blocks", "1", "--out", "o"], "--calib-seq-len", "16",
     "--calibration.seq_len", lambda a: a.calibration.seq_len == 16),
    (["prune-width", "--model", "m", "--ratio", "0.1", "--out", "o"], "--calib-source", "x.jsonl",
     "--calibration.source", lambda a: a.calibration.source == "x.jsonl"),
    (["score", "--model", "m", "--criterion", "ppl", "--out", "s.json"], "--seed", "5", "--calibration.seed",
     lambda a: a.calibration.seed == 5),
    (["retrain", "--model", "m", "--out", "o", "--train-tokens", "8"], "--data", "hf:x", "--data.source",
     lambda a: a.train.data.source == "hf:x"),
    (["retrain", "--model", "m", "--out", "o", "--train-tokens", "8"], "--seq-len", "64", "--data.seq_len",
     lambda a: a.train.data.seq_len == 64),
    (["retrain", "--model", "m", "--out", "o", "--train-tokens", "8"], "--lora-zero-stage", "3", "--lora.zero_stage",
     lambda a: a.train.lora.zero_stage == 3),
    (["retrain", "--model", "m", "--out", "o", "--train-tokens", "8"], "--teacher", "t/", "--distill.teacher",
     lambda a: a.train.distill.teacher == "t/"),
    (["retrain", "--model", "m", "--out", "o", "--train-tokens", "8"], "--workers", "4", "--num_workers",
     lambda a: a.scale.num_workers == 4),
    (["retrain", "--model", "m", "--out", "o", "--train-tokens", "8"], "--placement", "SPREAD",
     "--placement_strategy", lambda a: a.scale.placement_strategy == "SPREAD"),
    (["eval", "--model", "m", "--out", "r.json"], "--ppl-windows", "2", "--ppl_max_windows",
     lambda a: a.eval.ppl_max_windows == 2),
    (["results", "x"], "--store", "sqlite:///r.db", "--store_url", lambda a: a.store_url == "sqlite:///r.db"),
    (["sweep", "c.yaml"], "--store", "sqlite:///r.db", "--store_url", lambda a: a.store_url == "sqlite:///r.db"),
    (["select", "x"], "--tolerance", "10", "--tolerance_pct", lambda a: a.selection == {"tolerance_pct": 10}),
    (["select", "x"], "--max-latency", "0.5", "--max_latency_s", lambda a: a.selection == {"max_latency_s": 0.5}),
]


@pytest.mark.parametrize("argv, old, value, new, check", OLD, ids=[o[1] + "-" + o[0][0] for o in OLD])
def test_old_spellings_work_with_a_note(capsys, argv, old, value, new, check):
    args = build_parser().parse_args([*argv, old, value])
    assert check(args)
    verb = argv[0]
    assert capsys.readouterr().err == (f"shortened {verb}: note: {old} is deprecated, use {new} (the old spelling "
                                       "goes in the next release)\n")
    assert check(build_parser().parse_args([*argv, new, value])) and capsys.readouterr().err == ""
    assert all(old in VERB.deprecated for VERB in VERBS if VERB.name == verb)


def test_config_file_under_flags(tmp_path, capsys):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("train_tokens: 512\nlr: 3.0e-3\nlora: {r: 4}\ndata: {seq_len: 64}\n")
    args = build_parser().parse_args(["retrain", "--model", "m", "--out", "o", "--config", str(cfg), "--lr", "0.01",
                                      "--data.source", "hf:x"])
    t = args.train
    assert (t.train_tokens, t.lr, t.lora.r, t.data.seq_len, t.data.source) == (512, 0.01, 4, 64, "hf:x")
    cfg.write_text("train_tokens: 512\nlora: {r: 0}\n")
    assert main(["retrain", "--model", "m", "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert f"--config {cfg}: lora.r: must be an integer in [1, 4096], got 0" in capsys.readouterr().err
    cfg.write_text("train_tokens: 512\nlora_r: 4\n")
    assert main(["retrain", "--model", "m", "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert f"--config {cfg}: unknown field 'lora_r'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, message", [
    (["retrain", "--model", "m", "--out", "o", "--train-tokens", "8", "--offload-params"],
     "--offload-params needs --zero_stage 3 in a phase, got --zero_stage 2 (cpt)"),
    (["prune", "--model", "m", "--criterion", "magnitude", "--ratio", "0.2", "--blocks", "2", "--out", "o"],
     "give --ratio or --blocks, not both"),
    (["prune-width", "--model", "m", "--out", "o"], "give one of --ratio, --params or --like"),
    (["retrain", "--model", "m", "--out", "o"], "the following arguments are required: --train_tokens"),
    (["sweep", "c.yaml", "--name", "bad/x"],  # checked by SweepConfig's rule for the name it overrides
     "argument --name: 'bad/x' must be letters, digits, '_', '-', '.' (it names a folder)"),
    (["score", "--model", "m", "--criterion", "ppl", "--out", "s.json", "--calibration.n-samples", "0"],
     "argument --calibration.n-samples: must be an integer in [1, 1000000], got '0'"),
])
def test_model_checks_name_the_flags(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"shortened {argv[0]}: error: {message} (see shortened {argv[0]} --help)\n"
    assert list(tmp_path.iterdir()) == []


def test_select_budget_error_names_the_flags(monkeypatch, capsys):
    import shortened.cli as cli

    class Store:
        def experiment(self, name):
            return {"config": {"selection": {"metric": "ppl:wikitext2"}}}

        def trials(self, name):
            return []

    monkeypatch.setattr(cli, "open_experiment_args", lambda args: (Store(), "exp", None))
    assert main(["select", "exp", "--policy", "best_under_budget"]) == 2
    assert capsys.readouterr().err == ("shortened select: error: best_under_budget needs --max_params or "
                                       "--max_latency_s\n")


def test_criterion_help_names_every_criterion():
    from shortened.cli import ScoringOptions
    from shortened.criteria import CRITERIA

    doc = ScoringOptions.model_fields["criterion"].description
    assert [c for c in CRITERIA if c not in doc] == []
