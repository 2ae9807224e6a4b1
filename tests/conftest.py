"""Shared fixtures: the example models (loaded once per session) and the golden-file switch."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the CUDA simulator's tests run in a pytest process of their own (scripts/test.sh): the variable
# must be set before numba.cuda is imported, and it changes what numba.cuda is for everything else
collect_ignore = [] if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or \
    os.environ.get("GRADFUSE_TEST_TARGET") == "cuda" else ["cudasim"]  # (the second: on a GPU, device_check.sh)
EXAMPLES = os.path.join(ROOT, "examples")


def pytest_addoption(parser):
    parser.addoption("--accept", action="store_true",
                     help="rewrite golden files (tests/golden/) with the current output; review the diff")


@pytest.fixture(scope="session")
def accept(request) -> bool:
    return request.config.getoption("--accept") or os.environ.get("GRADFUSE_ACCEPT") == "1"


@pytest.fixture(scope="session")
def example_model():
    """example_model("digits_mlp") -> the gradfuse.Model defined in examples/digits_mlp.py."""
    from gradfuse.loader import load_model

    cache = {}

    def load(name: str):
        if name not in cache:
            cache[name] = load_model(os.path.join(EXAMPLES, f"{name}.py"))
        return cache[name]

    return load


@pytest.fixture(scope="session")
def golden(accept):
    """golden("name.gfir", text): compare with tests/golden/name.gfir, or rewrite it with --accept."""

    def check(name: str, text: str):
        path = os.path.join(ROOT, "tests", "golden", name)
        if accept or not os.path.exists(path):
            if not accept:
                pytest.fail(f"golden file {path} is missing: run pytest --accept to create it")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            return
        with open(path, encoding="utf-8") as f:
            expected = f.read()
        assert text == expected, f"output differs from {path} (run pytest --accept to update, then review the diff)"

    return check


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory) -> str:
    """One directory for the generated kernel modules (and Numba's cache) of the whole session."""
    return str(tmp_path_factory.mktemp("kernels"))


@pytest.fixture(scope="session")
def compiled_digits(example_model, kernel_cache):
    """The digits MLP compiled for the CPU with SGD + momentum, shared by the runtime tests."""
    import gradfuse as gf

    return gf.compile(example_model("digits_mlp"), gf.SGD(momentum=0.9), cache_dir=kernel_cache)
