"""Runs the docstring examples of every jaxbce module, as installed."""

import doctest
import importlib
import os
import pkgutil

import pytest

import jaxbce

MODULES = sorted(m.name for m in pkgutil.iter_modules(jaxbce.__path__, prefix="jaxbce."))


def test_every_module_is_found():
    assert "jaxbce._classification" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest failures in {name}"


def test_tests_run_against_the_installed_package():
    # CI sets JAXBCE_REQUIRE_INSTALLED=1: the suite must test what users get from pip,
    # not the source tree next to it.
    if os.environ.get("JAXBCE_REQUIRE_INSTALLED") != "1":
        pytest.skip("only enforced in CI")
    assert "site-packages" in jaxbce.__file__, jaxbce.__file__
