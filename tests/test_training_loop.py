"""The training workflow: batches, the model's own loss and the metrics its targets call for,
checkpoints that resume the same curve, plots, and `gradfuse train` end to end on a classifier,
a regression and a character-level language model (tiny configurations)."""

import json
import os

import numpy as np
import pytest

import gradfuse as gf
from gradfuse import datasets
from gradfuse.cli import main
from gradfuse.data import check_data
from gradfuse.errors import GradfuseError
from gradfuse.metrics import EVAL_ROWS, for_model
from gradfuse.training import TrainConfig, batches, fit, load_checkpoint, metrics_of, read_checkpoint

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.fixture
def fresh(example_model, kernel_cache):
    """A newly initialised compiled digits MLP (its kernels come from the session's cache)."""
    return lambda: gf.compile(example_model("digits_mlp"), gf.SGD(momentum=0.9), cache_dir=kernel_cache)


@pytest.fixture(scope="module")
def data(example_model, compiled_digits):
    c = compiled_digits
    return check_data(example_model("digits_mlp").data(), c.inputs, c.targets, c.prediction)


def test_batches_cover_every_example_once_with_a_last_partial_batch():
    parts = batches(10, 4, seed=0, epoch=1)
    assert [len(p) for p in parts] == [4, 4, 2]
    assert sorted(np.concatenate(parts)) == list(range(10))
    assert [len(p) for p in batches(9, 4, 0, 1)] == [4, 5]  # a batch of one joins the previous
    assert not np.array_equal(np.concatenate(batches(10, 4, 0, 1)), np.concatenate(batches(10, 4, 0, 2)))


def test_same_seed_same_run(fresh, data):
    config = TrainConfig(epochs=1, batch_size=128, seed=3)
    a = fit(fresh(), data, config).step_losses
    b = fit(fresh(), data, config).step_losses
    assert a == b


def test_resume_after_ctrl_c_continues_the_same_loss_curve(fresh, data, tmp_path, capsys):
    ckpt = str(tmp_path / "run.npz")
    config = TrainConfig(epochs=3, batch_size=128, seed=1, checkpoint=ckpt)
    whole = fit(fresh(), data, TrainConfig(epochs=3, batch_size=128, seed=1))

    def interrupt(epoch, batch):
        if (epoch, batch) == (2, 4):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(fresh(), data, config, on_step=interrupt)
    assert "interrupted: checkpoint written" in capsys.readouterr().out
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    resumed = fit(fresh(), data, config, resume=True)
    assert resumed.step_losses == whole.step_losses
    assert resumed.test == whole.test and set(whole.test) == {"loss", "accuracy"}


def test_checkpoint_of_another_model_or_version_is_refused(fresh, data, tmp_path, example_model, kernel_cache):
    ckpt = str(tmp_path / "c.npz")
    fit(fresh(), data, TrainConfig(epochs=1, batch_size=256, checkpoint=ckpt))
    other = gf.compile(example_model("residual_mlp"), cache_dir=kernel_cache)
    with pytest.raises(GradfuseError, match="a checkpoint of digits_mlp, not residual_mlp"):
        load_checkpoint(ckpt, other)
    with pytest.raises(GradfuseError, match="no such file"):
        load_checkpoint(str(tmp_path / "missing.npz"), fresh())
    meta, weights = read_checkpoint(ckpt)
    meta["version"] = 1
    np.savez(ckpt, __meta__=np.array(json.dumps(meta)), **{f"w/{k}": v for k, v in weights.items()})
    with pytest.raises(GradfuseError, match="format 1, this gradfuse reads format 2"):
        load_checkpoint(ckpt, fresh())


def test_the_test_loss_is_the_models_own_loss_in_chunks(compiled_digits, data):
    """The evaluation's loss is the model's loss graph on the predictions (float64), equal to
    a direct cross-entropy, and chunking the test set changes nothing."""
    c = compiled_digits
    metrics = metrics_of(c)
    assert metrics.task == "classification" and metrics.loss_name == "softmax_cross_entropy"
    x, y = data.test
    got = metrics.evaluate(c.predict, [x], [y])
    logits = c.predict(x).astype(np.float64)
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    assert got["loss"] == pytest.approx(-logp[np.arange(len(y)), y].mean(), rel=1e-12)
    assert got["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == y), abs=1e-15)
    big = [np.concatenate([x] * (EVAL_ROWS // len(x) + 2))], [np.concatenate([y] * (EVAL_ROWS // len(x) + 2))]
    assert len(big[0][0]) > EVAL_ROWS
    again = metrics.evaluate(c.predict, *big)
    assert again == pytest.approx(got, rel=1e-12)


def test_metrics_follow_the_targets():
    def tt(s):
        return gf.ir.types.parse_type(s)

    assert for_model(tt("f32[N,10]"), {"y": tt("i64[N]")}).names() == ["accuracy"]
    assert for_model(tt("f32[N,100]"), {"y": tt("i64[N]")}).names() == ["accuracy", "top5_accuracy"]
    lm = for_model(tt("f32[N,32,94]"), {"y": tt("i64[N,32]")})
    assert lm.task == "language model" and lm.headline == "bits"
    assert lm.names() == ["accuracy", "top5_accuracy", "nats", "bits", "perplexity"]
    reg = for_model(tt("f32[N,1]"), {"y": tt("f32[N,1]")}, custom={"max_error": lambda p, t: 0.0})
    assert reg.task == "regression" and reg.names() == ["mse", "mae", "max_error"]
    assert for_model(tt("f32[N,3]"), {"a": tt("f32[N,3]"), "b": tt("i64[N]")}).names() == []


def test_language_model_metrics_are_bits_and_perplexity_of_the_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=(6, 5))
    m = for_model(gf.ir.types.parse_type("f32[N,5,7]"), {"y": gf.ir.types.parse_type("i64[N,5]")})
    got = m.evaluate(lambda x: x, [logits], [labels])
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    nats = -np.mean(np.take_along_axis(z - np.log(np.exp(z).sum(-1, keepdims=True)), labels[..., None], -1))
    assert got["bits"] == pytest.approx(nats / np.log(2)) and got["perplexity"] == pytest.approx(np.exp(nats))
    assert "nats" not in m.describe(got) and "bits/token" in m.describe(got)


def test_cli_train_writes_checkpoint_plot_and_artifact_with_every_stage(tmp_path, capsys):
    out = tmp_path / "trained"
    code = main(["train", os.path.join(EXAMPLES, "digits_mlp.py"), "--epochs", "2", "--batch-size", "128",
                 "--checkpoint", str(tmp_path / "c.npz"), "--plot", str(tmp_path / "p.png"), "-o", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "loss softmax_cross_entropy, classification metrics" in text
    assert "epoch   2  train loss" in text and "test loss" in text and "accuracy" in text
    assert "wrote the trained model" in text and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(out / "ir")) == ["backward.gfir", "forward.gfir", "loss.gfir", "predict.fused.gfir",
                                              "train.fused.gfir", "train.gfir"]
    trained = gf.load(str(out))
    meta, weights = read_checkpoint(str(tmp_path / "c.npz"))
    assert all(np.array_equal(trained.weights[k], weights[k]) for k in trained.weights)
    assert meta["history"]["test"]["accuracy"][-1] > 0.8
    data = tmp_path / "d.npz"
    np.savez(data, **tiny(datasets.digits(), 256, 64))
    assert main(["train", str(out), "--data", str(data), "--epochs", "1"]) == 0  # an artifact: its loss graph
    assert "test loss" in capsys.readouterr().out


def test_a_failing_metric_is_named_before_training(tmp_path, capsys):
    model = tmp_path / "m.py"
    model.write_text(open(os.path.join(EXAMPLES, "digits_mlp.py")).read().replace(
        "    data=datasets.digits,\n", "    data=datasets.digits,\n    metrics={'broken': lambda p, y: p.nope},\n"))
    code = main(["train", str(model), "--epochs", "1"])
    captured = capsys.readouterr()
    assert code == 1 and "epoch" not in captured.out
    assert "error: metric 'broken' failed on predictions float32[2, 10]: AttributeError" in captured.err


def test_a_custom_metric_is_measured_printed_and_checkpointed(tmp_path, capsys):
    model = tmp_path / "m.py"
    model.write_text(open(os.path.join(EXAMPLES, "digits_mlp.py")).read().replace(
        "    data=datasets.digits,\n", "    data=datasets.digits,\n    metrics={'confident': lambda p, y: "
        "float((p.max(-1) - p.mean(-1) > 5).mean())},\n"))
    ckpt = tmp_path / "c.npz"
    assert main(["train", str(model), "--epochs", "1", "--batch-size", "256", "--checkpoint", str(ckpt)]) == 0
    assert "confident " in capsys.readouterr().out
    assert set(read_checkpoint(str(ckpt))[0]["history"]["test"]) == {"loss", "accuracy", "confident"}


def tiny(data: dict, n_train: int, n_test: int) -> dict:
    return {k: v[: n_train if k.endswith("_train") else n_test] for k, v in data.items()
            if k.endswith(("_train", "_test"))}


@pytest.mark.parametrize(("example", "sizes", "expected"), [
    ("regression", (128, 32), ["loss mse", "regression metrics", "test loss", "mse ", "mae "]),
    ("char_lm", (48, 16), ["language model metrics", "accuracy", "top-5", "bits/token", "perplexity"]),
], ids=["mse-regression", "char-lm-NxT-targets"])
def test_cli_trains_other_tasks_with_fitting_metrics_plot_and_resume(tmp_path, capsys, example_model, example,
                                                                    sizes, expected):
    data = tmp_path / "d.npz"
    np.savez(data, **tiny(example_model(example).data(), *sizes))
    path, ckpt, plot = os.path.join(EXAMPLES, f"{example}.py"), tmp_path / "c.npz", tmp_path / "p.png"
    args = ["train", path, "--data", str(data), "--batch-size", "16", "--checkpoint", str(ckpt), "--lr", "0.01"]
    assert main([*args, "--epochs", "1"]) == 0
    first = capsys.readouterr().out
    for fragment in expected:
        assert fragment in first, (fragment, first)
    assert main([*args, "--epochs", "2", "--resume", "--plot", str(plot)]) == 0
    second = capsys.readouterr().out
    assert "resumed from" in second and "epoch   2" in second and "epoch   1" not in second
    history = read_checkpoint(str(ckpt))[0]["history"]
    assert history["epoch"] == [1, 2] and all(len(v) == 2 for v in history["test"].values())
    assert plot.read_bytes()[:4] == b"\x89PNG"
