"""AOT artifacts: a fresh process loads and runs them without tracing, passes or compiling;
anything that is not exactly what was written is refused in words; writes are atomic."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import gradfuse as gf
from gradfuse.files import FileError
from gradfuse.runtime import artifact
from gradfuse.runtime.artifact import ArtifactError


@pytest.fixture(scope="module")
def saved(compiled_digits, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("artifact") / "digits")
    artifact.save(compiled_digits, path, {"forward": "func @f() {\n  return\n}\n"})
    return path


@pytest.fixture
def copy(saved, tmp_path):
    """A private copy of the artifact, to damage."""
    target = str(tmp_path / "copy")
    shutil.copytree(saved, target, copy_function=shutil.copy2)
    return target


FRESH_PROCESS = r"""
import json, sys, time, numpy as np
start = time.perf_counter()
import gradfuse as gf
from gradfuse.tracing import Tracer
Tracer.__init__ = None  # tracing in this process would fail loudly
m = gf.load(sys.argv[1])
loaded = time.perf_counter()
x = np.load(sys.argv[2]); y = np.load(sys.argv[3])
pred = m.predict(x)
first = time.perf_counter()
assert (m.predict(x) == pred).all()  # the second call: checked_step, compiled, from the artifact
loss = m.train_step(x, y, lr=0.05)
compiled = [f for p in m.programs().values() for f in [*vars(p.module).values(), p._compiled_step]
            if hasattr(f, "stats")]
assert m.predict_program._compiled_step in compiled
misses = sum(len(f.stats.cache_misses) for f in compiled)
np.save(sys.argv[4], pred)
np.savez(sys.argv[5], **m.weights)
print(json.dumps({"loss": loss, "misses": misses, "load": loaded - start, "first": first - loaded}))
"""


def test_a_fresh_process_gives_identical_predictions_and_next_step(compiled_digits, saved, tmp_path, example_model):
    data = example_model("digits_mlp").data()
    x, y = data["x_test"][:32], data["y_test"][:32]
    paths = [str(tmp_path / n) for n in ("x.npy", "y.npy", "pred.npy", "w.npz")]
    np.save(paths[0], x)
    np.save(paths[1], y)
    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS, saved, *paths], capture_output=True, text=True,
                         check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["misses"] == 0  # Numba compiled nothing: every kernel came from the artifact
    here = artifact.load(saved)
    np.testing.assert_array_equal(np.load(paths[2]), here.predict(x))
    loss = here.train_step(x, y, lr=0.05)
    assert report["loss"] == loss
    with np.load(paths[3]) as w:
        for k, v in here.weights.items():
            np.testing.assert_array_equal(w[k], v, err_msg=k)


def test_manifest_describes_the_artifact(saved, compiled_digits):
    manifest = artifact.read_manifest(saved)
    assert manifest["format_version"] == artifact.FORMAT_VERSION and manifest["target"] == "cpu"
    assert manifest["inputs"] == {"x": "f32[N,64]"} and manifest["targets"] == {"y": "i64[N]"}
    assert {"weights.npz", "ir/forward.gfir", "ir/train.fused.gfir"} <= set(manifest["files"])
    assert any(f.endswith(".nbc") for f in manifest["files"])  # the compiled kernels travel with it
    assert set(manifest["programs"]) == {"predict", "train"}


def _damage(path, rel, how):
    full = os.path.join(path, rel)
    data = bytearray(open(full, "rb").read())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    open(full, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("rel", ["weights.npz", "ir/train.fused.gfir", "kernels"])
def test_a_damaged_file_is_refused(copy, rel, how):
    if rel == "kernels":
        rel = next(f for f in artifact.read_manifest(copy)["files"] if f.endswith(".nbc"))
    _damage(copy, rel, how)
    with pytest.raises(ArtifactError, match=f"{rel} does not match its hash in the manifest"):
        gf.load(copy)


def _edit_manifest(path, **changes):
    mpath = os.path.join(path, "manifest.json")
    manifest = json.load(open(mpath))
    manifest.update(changes)
    json.dump(manifest, open(mpath, "w"))


def test_another_format_version_target_or_cpu_is_refused(copy):
    _edit_manifest(copy, format_version=99)
    with pytest.raises(ArtifactError, match="format version 99, this gradfuse reads version 1"):
        gf.load(copy)
    _edit_manifest(copy, format_version=artifact.FORMAT_VERSION, target="tpu")
    with pytest.raises(ArtifactError, match="compiled for target 'tpu', not 'cpu'"):
        gf.load(copy)
    _edit_manifest(copy, target="cuda")  # this machine has no GPU (CI's neither)
    with pytest.raises(ArtifactError, match="compiled for target cuda.*no CUDA GPU here"):
        gf.load(copy)
    cpu = artifact.cpu_identity()
    _edit_manifest(copy, target="cpu", cpu={**cpu, "cpu": "some-other-cpu"})
    with pytest.raises(ArtifactError, match="compiled for another CPU .*'some-other-cpu'.*recompile=True"):
        gf.load(copy)
    assert gf.load(copy, recompile=True).predict(np.zeros((2, 64), np.float32)).shape == (2, 10)


def test_missing_file_corrupt_manifest_and_not_an_artifact(copy, tmp_path):
    os.remove(os.path.join(copy, "weights.npz"))
    with pytest.raises(ArtifactError, match="weights.npz is missing"):
        gf.load(copy)
    open(os.path.join(copy, "manifest.json"), "w").write('{"format": "gradfuse-art')
    with pytest.raises(ArtifactError, match="manifest.json is corrupted"):
        gf.load(copy)
    with pytest.raises(ArtifactError, match="not a gradfuse artifact"):
        gf.load(str(tmp_path))
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        gf.load(str(tmp_path / "nothing"))


def test_a_crash_mid_write_leaves_the_old_artifact(compiled_digits, copy, monkeypatch):
    before = artifact.read_manifest(copy)
    original = np.savez

    def crash(*args, **kwargs):
        original(*args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(artifact.np, "savez", crash)
    with pytest.raises(FileError, match=f"artifact {copy}: disk full"):
        artifact.save(compiled_digits, copy)
    assert artifact.read_manifest(copy) == before  # the old one, intact and loadable
    gf.load(copy)
    assert not [p for p in os.listdir(os.path.dirname(copy)) if ".tmp" in p]


def test_a_crash_mid_write_leaves_no_half_artifact(compiled_digits, tmp_path, monkeypatch):
    target = str(tmp_path / "new")
    monkeypatch.setattr(artifact.np, "savez", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(FileError, match="disk full"):
        artifact.save(compiled_digits, target)
    assert not os.path.exists(target) and os.listdir(tmp_path) == []


def test_save_refuses_to_replace_a_directory_that_is_not_an_artifact(compiled_digits, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(FileError, match="is not a gradfuse artifact; refusing to replace it"):
        artifact.save(compiled_digits, str(other))
    assert (other / "thesis.tex").read_text() == "precious"
