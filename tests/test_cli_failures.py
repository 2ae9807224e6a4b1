"""Every bad input through the command line: one line on stderr that says what, where and why,
exit 1, no traceback, no temporary file left, and the previous checkpoint or artifact intact.

Unwritable places are made for real: a read-only or a small (full) tmpfs mounted where the
tests run as root (root ignores permission bits), and a chmod-ed directory otherwise.
"""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from gradfuse.cli import main

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
MLP = os.path.join(EXAMPLES, "digits_mlp.py")
QUICK = ["--epochs", "1", "--batch-size", "256"]


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code, err, *fragments):
    assert code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err


def leftovers(folder) -> list[str]:
    return [p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) + glob.glob(
        os.path.join(folder, ".*")) if ".tmp" in os.path.basename(p) or "probe" in p]


@pytest.fixture
def mount(tmp_path):
    """mount("ro") or mount("64k"): a tmpfs folder, read-only or of that size (root only)."""
    mounted = []

    def make(option: str) -> str:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (CI runs as root); the chmod tests cover the rest here")
        where = tmp_path / f"fs-{len(mounted)}"
        where.mkdir()
        opts = "ro,size=64k" if option == "ro" else f"size={option}"
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True,
                                text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(where)
        return str(where)

    yield make
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


@pytest.fixture
def unwritable(tmp_path, mount):
    """A directory nobody here can write to: a read-only mount as root, chmod 500 otherwise."""
    if os.geteuid() == 0:
        yield mount("ro")
        return
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    yield str(folder)
    folder.chmod(0o700)


@pytest.mark.parametrize("flag", ["-o", "--checkpoint", "--plot"])
def test_train_refuses_an_unwritable_output_before_training(capsys, unwritable, flag):
    target = os.path.join(unwritable, "sub", "out")
    code, out, err = cli(capsys, "train", MLP, *QUICK, flag, target)
    one_line_error(code, err, target, "cannot create files in")
    assert "epoch" not in out  # refused before any work


def test_outputs_of_the_wrong_kind_are_refused(capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = cli(capsys, "train", MLP, *QUICK, "-o", a_file)
    one_line_error(code, err, f"artifact {a_file}: is a file, not a directory")
    code, _, err = cli(capsys, "train", MLP, *QUICK, "--checkpoint", tmp_path)
    one_line_error(code, err, "is a directory; give a file name")
    code, _, err = cli(capsys, "train", MLP, *QUICK, "--plot", a_file / "p.png")
    one_line_error(code, err, "is a file, not a directory")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = cli(capsys, "compile", MLP, "-o", tmp_path / "mine")
    one_line_error(code, err, "is not a gradfuse artifact; refusing to replace it")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_run_output_into_a_read_only_place(capsys, tmp_path, unwritable, example_model):
    x = tmp_path / "x.npy"
    np.save(x, example_model("digits_mlp").data()["x_test"][:4])
    code, out, err = cli(capsys, "run", MLP, "--input", x, "--output", os.path.join(unwritable, "y.npy"))
    one_line_error(code, err, "output", "y.npy")
    assert out == ""


def test_a_full_disk_keeps_the_previous_checkpoint_and_rescues_the_weights(capsys, mount, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where rescued weights go
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    fs = mount("140k")  # one checkpoint of the digits MLP (87 KB) fits, a second beside it does not
    ckpt = os.path.join(fs, "ck.npz")
    code, out, _ = cli(capsys, "train", MLP, *QUICK, "--checkpoint", ckpt)
    assert code == 0 and os.path.getsize(ckpt) > 80_000
    before = open(ckpt, "rb").read()
    code, out, err = cli(capsys, "train", MLP, "--epochs", "2", "--batch-size", "256", "--seed", "1",
                         "--checkpoint", ckpt)
    one_line_error(code, err, f"checkpoint {ckpt}: No space left on device", "training stopped",
                   "the checkpoint went to", "--resume")
    assert open(ckpt, "rb").read() == before and not leftovers(fs)
    rescued = err.split("went to ")[1].split(" instead")[0]
    assert os.path.dirname(rescued) == str(tmp_path)
    code, out, _ = cli(capsys, "train", MLP, "--epochs", "2", "--batch-size", "256", "--checkpoint", rescued,
                       "--resume")
    assert code == 0 and "resumed from" in out and "epoch   2" in out


def test_a_full_disk_for_the_artifact_loses_no_trained_weights(capsys, mount, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    fs = mount("300k")  # the digits MLP's artifact is ~760 KB
    code, out, err = cli(capsys, "train", MLP, *QUICK, "-o", os.path.join(fs, "mlp"))
    one_line_error(code, err, "artifact", "No space left on device", "the trained weights are safe in",
                   "--weights")
    assert "epoch   1" in out and os.listdir(fs) == []
    rescued = err.split("safe in ")[1].split(" ")[0]
    code, out, _ = cli(capsys, "compile", MLP, "--weights", rescued, "-o", tmp_path / "art")
    assert code == 0 and f"weights:       the weights of checkpoint {rescued}" in out


def test_run_on_a_full_disk_leaves_no_partial_output(capsys, mount, tmp_path, example_model):
    fs = mount("8k")
    x = tmp_path / "x.npy"
    np.save(x, example_model("digits_mlp").data()["x_test"])  # 449 x 10 float32 outputs: 18 KB
    y = os.path.join(fs, "y.npy")
    code, _, err = cli(capsys, "run", MLP, "--input", x, "--output", y)
    one_line_error(code, err, f"output {y}: No space left on device")
    assert os.listdir(fs) == []


def test_a_previous_artifact_survives_a_failed_write(capsys, tmp_path, monkeypatch):
    out = tmp_path / "art"
    assert cli(capsys, "compile", MLP, "-o", out)[0] == 0
    manifest = (out / "manifest.json").read_text()
    import gradfuse.runtime.artifact as artifact

    def full_disk(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifact.np, "savez", full_disk)
    code, _, err = cli(capsys, "compile", MLP, "-o", out)
    one_line_error(code, err, f"artifact {out}: No space left on device")
    assert (out / "manifest.json").read_text() == manifest and sorted(os.listdir(tmp_path)) == ["art"]


@pytest.mark.parametrize("content", [b"not a zip at all", b"PK\x03\x04" + b"\0" * 40, b""],
                         ids=["garbage", "truncated-zip", "empty"])
def test_corrupt_checkpoint_is_one_line(capsys, tmp_path, content):
    ckpt = tmp_path / "ck.npz"
    ckpt.write_bytes(content)
    code, out, err = cli(capsys, "train", MLP, *QUICK, "--checkpoint", ckpt, "--resume")
    one_line_error(code, err, f"checkpoint {ckpt}: ")
    assert ckpt.read_bytes() == content and "epoch" not in out
    code, _, err = cli(capsys, "compile", MLP, "--weights", ckpt, "-o", tmp_path / "a")
    one_line_error(code, err, str(ckpt))


def test_resume_needs_a_checkpoint_and_a_finished_run_says_so(capsys, tmp_path):
    code, _, err = cli(capsys, "train", MLP, *QUICK, "--resume")
    one_line_error(code, err, "--resume needs --checkpoint")
    code, _, err = cli(capsys, "train", MLP, *QUICK, "--resume", "--checkpoint", tmp_path / "none.npz")
    one_line_error(code, err, "nothing to resume: no checkpoint at")
    ckpt = tmp_path / "ck.npz"
    assert cli(capsys, "train", MLP, *QUICK, "--checkpoint", ckpt)[0] == 0
    code, out, _ = cli(capsys, "train", MLP, *QUICK, "--checkpoint", ckpt, "--resume")
    assert code == 0 and "training already finished (1 of 1 epochs done); nothing to train" in out
    assert "epoch   1" not in out


def data_file(tmp_path, example_model, **changes) -> str:
    data = dict(example_model("digits_mlp").data())
    data.update(changes)
    path = str(tmp_path / "data.npz")
    np.savez(path, **{k: v for k, v in data.items() if v is not None})
    return path


def digits(example_model):
    return example_model("digits_mlp").data()


@pytest.mark.parametrize(("change", "fragments"), [
    (lambda d: {"x_train": np.where(np.arange(d["x_train"].size).reshape(d["x_train"].shape) == 70, np.nan,
                                    d["x_train"])}, ["x_train holds 1 NaN/Inf values in 1 rows (first: row 1)"]),
    (lambda d: {"y_train": d["y_train"][:-3]}, ["different lengths", "x_train 1348", "y_train 1345"]),
    (lambda d: {"x_train": d["x_train"].reshape(-1, 8, 8)}, ["x_train has shape [1348, 8, 8]", "f32[N,64]",
                                                               "x_train.reshape(len(x_train), 64)"]),
    (lambda d: {"y_train": d["y_train"].astype(np.float32)}, ["y_train is float32", "integer classes"]),
    (lambda d: {"y_train": d["y_train"] + 1}, ["y_train: labels must lie in [0, 10)", "max 10"]),
    (lambda d: {"y_train": None}, ["lacks y_train", "it has x_test, x_train, y_test"]),
    (lambda d: {"y_test": None}, ["a test split without y_test"]),
    (lambda d: {"x_test": np.zeros((0, 64), np.float32), "y_test": np.zeros(0, np.int64)}, ["x_test is empty"]),
], ids=["nan", "lengths", "shape", "float-labels", "label-range", "missing", "half-test-split", "empty"])
def test_bad_data_is_refused_before_the_first_step(capsys, tmp_path, example_model, change, fragments):
    path = data_file(tmp_path, example_model, **change(digits(example_model)))
    code, out, err = cli(capsys, "train", MLP, *QUICK, "--data", path)
    one_line_error(code, err, *fragments)
    assert "epoch" not in out


def test_float64_data_is_converted_with_a_note(capsys, tmp_path, example_model):
    d = digits(example_model)
    path = data_file(tmp_path, example_model, x_train=d["x_train"].astype(np.float64))
    code, out, _ = cli(capsys, "train", MLP, *QUICK, "--data", path)
    assert code == 0 and "note: x_train: float64 converted to float32" in out


def test_divergence_stops_with_the_step_and_keeps_the_last_good_files(capsys, tmp_path):
    ckpt, art = tmp_path / "ck.npz", tmp_path / "art"
    assert cli(capsys, "train", MLP, *QUICK, "--checkpoint", ckpt, "-o", art)[0] == 0
    saved, manifest = ckpt.read_bytes(), (art / "manifest.json").read_text()
    code, out, err = cli(capsys, "train", MLP, "--epochs", "3", "--lr", "1e30", "--checkpoint", ckpt, "-o", art)
    one_line_error(code, err, "epoch 1, step 2 of 22: the training loss is nan", "learning rate (1e+30)",
                   "--check", "nothing was written")
    assert ckpt.read_bytes() == saved and (art / "manifest.json").read_text() == manifest
    code, _, err = cli(capsys, "train", MLP, "--epochs", "3", "--lr", "1e30", "--check")
    one_line_error(code, err, "epoch 1, step 2", "kernel", "%fc2.matmul = matmul at digits_mlp.py:18 in fc2",
                   "produced NaN/Inf")


def test_run_reads_npz_arrays_and_warns_on_nan_inputs(capsys, tmp_path, example_model):
    path = data_file(tmp_path, example_model)
    out_file = tmp_path / "y.npy"
    code, out, err = cli(capsys, "run", MLP, "--input", f"{path}:x_test", "--output", out_file)
    assert code == 0 and err == "" and np.load(out_file).shape == (449, 10)
    code, out, err = cli(capsys, "run", MLP, "--input", path)  # picks x_test: the model's input is x
    assert code == 0 and "-> float32[449, 10]" in out
    code, _, err = cli(capsys, "run", MLP, "--input", f"{path}:nope")
    one_line_error(code, err, f"input {path}: a .npz of", "--input")
    x = digits(example_model)["x_test"][:3].copy()
    x[1, 5] = np.inf
    np.save(tmp_path / "x.npy", x)
    code, out, err = cli(capsys, "run", MLP, "--input", tmp_path / "x.npy")
    assert code == 0 and err.startswith("warning: ") and "NaN/Inf in 1 of 3 examples (first: row 1)" in err
    for bad, fragment in [(b"garbage", "not a numpy .npy or .npz file"), (None, "no such file")]:
        if bad is not None:
            (tmp_path / "bad.npy").write_bytes(bad)
        code, _, err = cli(capsys, "run", MLP, "--input", tmp_path / ("bad.npy" if bad else "missing.npy"))
        one_line_error(code, err, "input", fragment)


def test_errors_through_a_real_process_have_no_traceback(tmp_path):
    bad = tmp_path / "ck.npz"
    bad.write_bytes(b"garbage")
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "gradfuse"), "train", MLP, *QUICK,
                             "--checkpoint", str(bad), "--resume"], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: checkpoint {bad}:") and result.stderr.count("\n") == 1


def test_ir_dumps_and_the_compile_cache_in_unwritable_places(capsys, unwritable, tmp_path):
    code, out, err = cli(capsys, "show", MLP, "--stage", "fused", "--dump-passes", os.path.join(unwritable, "d"))
    one_line_error(code, err, "IR dump folder", "cannot create files in")
    assert out == ""
    env = {**os.environ, "GRADFUSE_CACHE": os.path.join(unwritable, "cache")}
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "gradfuse"), "compile", MLP, "-o",
                             str(tmp_path / "art")], capture_output=True, text=True, env=env)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: the compile cache (move it with GRADFUSE_CACHE)"), result.stderr


def test_a_model_without_a_loss_cannot_train(capsys, tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import gradfuse as gf\nfrom gradfuse import nn\n"
                    "model = gf.Model(nn.Linear(4, 2), inputs={'x': 'f32[N,4]'})\n")
    code, _, err = cli(capsys, "train", path, *QUICK)
    one_line_error(code, err, "has no loss to train on")
