"""The training workflow: batches, evaluation, checkpoints that resume the same curve, plots."""

import os

import numpy as np
import pytest

import gradfuse as gf
from gradfuse.cli import main
from gradfuse.errors import GradfuseError
from gradfuse.training import TrainConfig, batches, fit, load_checkpoint, load_data


@pytest.fixture
def fresh(example_model, kernel_cache):
    """A newly initialised compiled digits MLP (its kernels come from the session's cache)."""
    return lambda: gf.compile(example_model("digits_mlp"), gf.SGD(momentum=0.9), cache_dir=kernel_cache)


@pytest.fixture(scope="module")
def data(example_model):
    return example_model("digits_mlp").data()


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
    assert resumed.test_accuracy == whole.test_accuracy


def test_checkpoint_of_another_model_or_version_is_refused(fresh, data, tmp_path, example_model, kernel_cache):
    ckpt = str(tmp_path / "c.npz")
    fit(fresh(), data, TrainConfig(epochs=1, batch_size=256, checkpoint=ckpt))
    other = gf.compile(example_model("residual_mlp"), cache_dir=kernel_cache)
    with pytest.raises(GradfuseError, match="a checkpoint of digits_mlp, not residual_mlp"):
        load_checkpoint(ckpt, other)
    with pytest.raises(GradfuseError, match="not a gradfuse checkpoint"):
        load_checkpoint(str(tmp_path / "missing.npz"), fresh())


def test_plot_and_data_from_npz(fresh, data, tmp_path):
    path = str(tmp_path / "d.npz")
    np.savez(path, **data)
    png = str(tmp_path / "curves.png")
    history = fit(fresh(), load_data(path), TrainConfig(epochs=2, batch_size=64, plot=png))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(history.test_accuracy) == 2 and history.test_accuracy[-1] > 0.8
    np.savez(path, x=data["x_train"])
    with pytest.raises(GradfuseError, match="missing x_train, y_train"):
        load_data(path)


def test_cli_train_writes_checkpoint_plot_and_artifact(tmp_path, capsys, kernel_cache, monkeypatch):
    monkeypatch.setenv("GRADFUSE_CACHE", kernel_cache)
    model = os.path.join(os.path.dirname(__file__), "..", "examples", "digits_mlp.py")
    out = tmp_path / "trained"
    code = main(["train", model, "--epochs", "2", "--batch-size", "128", "--checkpoint", str(tmp_path / "c.npz"),
                 "--plot", str(tmp_path / "p.png"), "-o", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "epoch   2" in text and "test accuracy" in text and "wrote the trained model" in text
    assert (tmp_path / "p.png").exists() and (out / "manifest.json").exists()
