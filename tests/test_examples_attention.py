"""The examples of issue 13 in tiny configurations: the character transformer trains, reports and
samples; the deep plain sigmoid MLP's gradients vanish where the residual one's do not."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest

from gradfuse.cli import main as cli
from gradfuse.errors import GradfuseError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_char_transformer_trains_reports_and_samples(tmp_path, capsys):
    ct = example("char_transformer")
    out = str(tmp_path / "ct")
    compiled, vocabulary, report = ct.train(minutes=5, layers=1, dim=32, heads=2, batch=8, lr=3e-3, output=out,
                                            max_steps=40)
    assert report["steps"] == 40 and math.isfinite(report["nats"])
    assert report["nats"] < math.log(len(vocabulary))  # better than uniform guessing after 40 steps
    assert abs(report["unigram_nats"] - 3.25) < 0.05
    assert math.isclose(report["bits"], report["nats"] / math.log(2))
    text = ct.sample(compiled, vocabulary, "The ", chars=20)
    assert text.startswith("The ") and len(text) == 24
    ct.main(["sample", out, "--prompt", "def ", "--chars", "10"])  # the artifact, loaded again
    printed = capsys.readouterr().out
    assert "held-out:" in printed and "bits/char" in printed
    assert printed.split("sample with:")[-1].split("\n", 1)[1].startswith("def ")
    with pytest.raises(GradfuseError, match="never saw"):
        ct.sample(compiled, vocabulary, "\x00", chars=1)
    # the same from the command line: gradfuse sample ARTIFACT --prompt ...
    assert cli(["sample", out, "--prompt", "def ", "--chars", "10", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith("\n") and printed.startswith("def ") and len(printed) == 15
    assert set(printed[:-1]) <= set(vocabulary.tolist())
    assert cli(["sample", out, "--prompt", "\x00"]) == 1 and "never saw" in capsys.readouterr().err
    assert cli(["sample", str(tmp_path), "--prompt", "a"]) == 1 and "no vocabulary" in capsys.readouterr().err


def test_deep_plain_gradients_vanish_and_residual_ones_do_not():
    dv = example("deep_vs_residual")
    assert dv.first_to_last(dv.plain, batch=16) < 1e-4
    assert dv.first_to_last(dv.residual, batch=16) > 1e-2


def test_the_residual_network_trains_where_the_plain_one_does_not():
    dv = example("deep_vs_residual")
    assert dv.train(dv.residual, epochs=2) > 0.6
    assert dv.train(dv.plain, epochs=2) < 0.3
