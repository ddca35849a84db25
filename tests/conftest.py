"""Strict settings for the whole suite, and the shared reference module on the path.

No implicit rank promotion anywhere, and strict dtype promotion (no implicit mixing of
float32 with bfloat16, or of floats with integer arrays) for jaxbce's own code. Tests
that run optax or flax training, which promote implicitly, are marked
``standard_promotion``.
"""

import importlib
import sys
from pathlib import Path

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# tests/reference.py, imported as ``reference`` (pytest runs with --import-mode=importlib),
# and the example scripts, which import each other as top-level modules.
sys.path.insert(0, str(Path(__file__).resolve().parent))
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "standard_promotion: runs third-party code (optax, flax) that promotes dtypes"
    )


@pytest.fixture(autouse=True)
def _dtype_promotion(request):
    if request.node.get_closest_marker("standard_promotion"):
        with jax.numpy_dtype_promotion("standard"):
            yield
    else:
        yield


@pytest.fixture(scope="session")
def main_job(tmp_path_factory):
    """The examples' main job (``examples/main.py``), run once for every module that
    checks a trainer's default quality: ``(results by job, output directory)``."""
    out = tmp_path_factory.mktemp("main")
    with jax.numpy_dtype_promotion("standard"):  # optax promotes implicitly
        return importlib.import_module("main").main(["--out", str(out), "--quiet"]), out
