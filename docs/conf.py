"""Sphinx configuration of the jaxbce documentation.

Build it (offline; warnings are errors) from the repository root with::

    pip install -e ".[docs]"
    python -m sphinx -W -b html docs docs/_build/html

``_ext/jaxbce_docs.py`` writes the API pages from ``jaxbce.__all__`` and runs the
examples for their figures; both outputs are ignored by git.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

import jaxbce  # noqa: E402

project = "jaxbce"
author = "jaxbce developers"
copyright = "jaxbce developers"
version = release = jaxbce.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax served from _static, not a CDN
    "sphinx_copybutton",
    "matplotlib.sphinxext.plot_directive",
    "myst_parser",
    "jaxbce_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

# -- API pages: Google-style docstrings with .. math:: and doctest blocks
autodoc_typehints = "signature"
autodoc_type_aliases = {"ArrayLike": "ArrayLike"}  # not the expanded Union
autodoc_preserve_defaults = True
add_module_names = False
python_maximum_signature_line_length = 88  # one parameter a line past this
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autosummary_generate = False  # the pages come from _ext/jaxbce_docs.py

# -- Figures drawn at build time by {plot} blocks
plot_include_source = True
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]

# -- Markdown pages
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3  # [text](#a-heading) links in docs/performance.md

# -- HTML
html_theme = "furo"
html_title = f"jaxbce {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_show_sourcelink = False
html_copy_source = False
pygments_style = "sphinx"
pygments_dark_style = "monokai"
copybutton_prompt_text = r">>> |\.\.\. |\$ "  # copy code without prompts and outputs
copybutton_prompt_is_regexp = True
