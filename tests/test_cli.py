"""``python -m dhsa``: options are checked by DHSAConfig right after parsing
(argparse errors, exit status 2, naming the option), every option has help
text, and the options reach what they name (``--threads`` the patch)."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from dhsa.__main__ import COMMANDS, build_parser, main
from dhsa.harness import demo, eval as ev


def _subparsers(parser: argparse.ArgumentParser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_demo_budget_below_the_forced_keys_is_an_argparse_error(tmp_path):
    """The README's demo with a budget that cannot hold sink + local + block."""
    r = subprocess.run([sys.executable, "-m", "dhsa", "demo", "--budget", "300"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last == ("python -m dhsa demo: error: --budget (300) must be >= sink + local + "
                    "block_size (384): those keys are always kept"), last
    assert r.stderr.startswith("usage: python -m dhsa demo")


@pytest.mark.parametrize("argv, message", [
    (["demo", "--budget", "512", "--sink", "300"], "--budget (512) must be >= sink + local"),
    (["demo", "--block-size", "0"], "--block-size must be >= 1, got 0"),
    (["demo", "--threads", "0"], "argument --threads: must be a positive number of threads"),
    (["niah", "--budget", "100"], "--budget (100) must be >= sink + local + block_size (384)"),
    (["ppl", "--budgets", "1024", "200"], "--budgets 200: --budget (200) must be >= sink"),
    (["recall", "--local", "-1"], "--local must be >= 0, got -1"),
    (["calibrate", "--out", "x.json", "--density", "0"], "argument --density: must be in (0, 1]"),
    (["calibrate", "--out", "x.json", "--length", "-5"], "argument --length: must be a positive"),
    (["calibrate", "--out", "x.json", "--variant", "dense"], "argument --variant: invalid choice"),
    (["calibrate", "--out", "x.json", "--text", "/no/such/file.txt"], "argument --text: no such file"),
    (["calibrate", "--out", "x.json", "--variant", "block_topk", "--boundaries"],
     "argument --boundaries: block_topk has no dynamic chunks"),
    (["calibrate", "--out", "x.json", "--boundary-window", "0"],
     "argument --boundary-window: must be a positive"),
    (["calibrate", "--out", "x.json", "--boundary-nms-radius", "-1"],
     "argument --boundary-nms-radius: must be >= 0"),
    (["recall", "--threads", "-2"], "argument --threads: must be a positive number"),
])
def test_invalid_options_end_in_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"python -m dhsa {argv[0]}: error: " in err and message in err, err


def test_every_option_has_help_text():
    parser = build_parser()
    subs = _subparsers(parser)
    assert sorted(subs) == sorted(COMMANDS)
    missing = [(name, a.option_strings) for name, p in subs.items() for a in p._actions
               if a.option_strings and not a.help]
    assert not missing


def test_the_config_is_made_once_after_parsing():
    args = build_parser().parse_args(["demo", "--budget", "640", "--sink", "32",
                                      "--granularity", "layer"])
    cfg = args._config(args)
    assert (cfg.budget, cfg.sink, cfg.granularity) == (640, 32, "layer")
    assert cfg == demo.config_from_args(args)


def test_eval_threads_reach_the_commands(monkeypatch, tmp_path):
    """--threads is no longer parsed and dropped: niah passes it to run_niah."""
    seen = {}
    monkeypatch.setattr("dhsa.harness.models.load_smollm2", lambda **kw: (None, None))

    def fake_run_niah(model, tok, **kw):
        seen.update(kw)
        return []

    monkeypatch.setattr(ev, "run_niah", fake_run_niah)
    rc = main(["niah", "--threads", "3", "--budget", "512", "--out", str(tmp_path),
               "--methods", "dhsa"])
    assert rc == 0
    assert seen["num_threads"] == 3 and seen["base"] == ev.DHSAConfig()  # the base config
    assert seen["budget"] == 512


def test_eval_threads_reach_the_patch(monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from dhsa import patching
    calls = []

    class Handle:
        def mean_density(self, include_dense=True):
            return 0.5

    monkeypatch.setattr(patching, "patch", lambda model, cfg, **kw: calls.append(kw) or Handle())
    monkeypatch.setattr(patching, "unpatch", lambda model: True)
    result, density = ev._with_method(object(), "dhsa", 512, None, lambda: "ran",
                                      num_threads=2)
    assert (result, density) == ("ran", 0.5)
    assert calls[0]["num_threads"] == 2
    assert ev._with_method(object(), "dense", 512, None, lambda: "exact", num_threads=2) == \
        ("exact", None)
    assert len(calls) == 1


def test_no_aliases_for_old_scripts():
    assert not [n for n in ("_reset_peak_rss", "_rss_kib", "_peak_rss_mib") if hasattr(demo, n)]
