"""Runs the docstring examples of every jaxbce module, as installed."""

import doctest
import importlib
import math
import os
import pkgutil
import re

import pytest

import jaxbce

MODULES = sorted(m.name for m in pkgutil.iter_modules(jaxbce.__path__, prefix="jaxbce."))


def test_every_module_is_found():
    assert "jaxbce._classification" in MODULES


_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
# The examples print float32 results as the CPU computes them; a GPU's exp and log round
# differently in the last place (0.22009484 vs 0.22009486), and it keeps the subnormals
# that XLA:CPU flushes to 0 (6.1e-40): numbers match to 1e-6, or both are below the
# smallest normal float32.
RTOL = 1e-6
ATOL = 1.2e-38


def _text(out: str) -> str:
    """The output without its numbers and whitespace (numpy pads numbers to one width)."""
    return re.sub(r"\s+", "", _NUMBER.sub("#", out))


class _FloatChecker(doctest.OutputChecker):
    """Exact text, except that numbers need only agree to ``RTOL`` (or ``ATOL``)."""

    def check_output(self, want, got, optionflags):
        if super().check_output(want, got, optionflags):
            return True
        w, g = _NUMBER.findall(want), _NUMBER.findall(got)
        if len(w) != len(g) or _text(want) != _text(got):
            return False
        return all(
            math.isclose(float(a), float(b), rel_tol=RTOL, abs_tol=ATOL)
            for a, b in zip(w, g, strict=True)
        )


def test_float_checker_tolerates_the_last_place_only():
    c = _FloatChecker()
    assert c.check_output("[0.22009484 0.4870385 ]\n", "[0.22009486 0.4870385 ]\n", 0)
    assert not c.check_output("[0.22009484 0.4870385 ]\n", "[0.22019484 0.4870385 ]\n", 0)
    assert not c.check_output("Array(1., dtype=float32)\n", "Array(1., dtype=bfloat16)\n", 0)
    assert c.check_output("[ 0.08 -0.1467995 ]]\n", "[ 0.08 -0.14679952]]\n", 0)
    assert c.check_output("[2.25e+01 0.0000000e+00]\n", "[2.25e+01 6.1455065e-40]\n", 0)
    assert not c.check_output("[0.0]\n", "[1e-30]\n", 0)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(
        checker=_FloatChecker(), optionflags=doctest.NORMALIZE_WHITESPACE
    )
    tests = doctest.DocTestFinder().find(module)
    assert name != "jaxbce._classification" or sum(len(t.examples) for t in tests) > 5
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} doctest failures in {name}"


def test_tests_run_against_the_installed_package():
    # CI sets JAXBCE_REQUIRE_INSTALLED=1: the suite must test what users get from pip,
    # not the source tree next to it.
    if os.environ.get("JAXBCE_REQUIRE_INSTALLED") != "1":
        pytest.skip("only enforced in CI")
    assert "site-packages" in jaxbce.__file__, jaxbce.__file__
