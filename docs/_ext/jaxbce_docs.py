"""Build-time parts of the jaxbce docs: API pages from ``jaxbce.__all__``, example figures.

* ``api/<name>.rst`` for every name in ``jaxbce.__all__`` and ``api/index.rst`` listing
  them, written before Sphinx reads the sources, so a name added to ``__all__`` gets a
  page with no edit to the docs. After reading, the build fails if a name has no page or
  the page does not document it.
* Markdown links from a page to a ``.md`` file outside ``docs/`` (``docs/performance.md``
  links its benchmark tables, ``../benchmarks/results/cpu/results.md``, so that they work
  on GitHub) become download links to that file, as links to other files already are,
  instead of references to a missing page.
* ``_generated/``: the figures and printed output of the examples (the stability picture
  and the trainers), made by calling the examples' own ``main`` functions; rerun
  only when the examples or the library change.

Both directories are generated and ignored by git.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import io
import os
import re
import shutil
import sys
from pathlib import Path

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util import logging

import jaxbce

logger = logging.getLogger(__name__)

API_DIR = "api"
GENERATED_DIR = "_generated"

API_INTRO = """\
API reference
=============

Every public name of ``jaxbce`` (its ``__all__``), one page each, from the docstrings.
The losses take logits or probabilities of any float dtype, labels as float, bool or
integer arrays, and check shapes, dtypes and options at trace time.

.. currentmodule:: jaxbce

.. autosummary::
   :nosignatures:

{entries}

.. toctree::
   :hidden:

{toc}
"""

# Examples run at build time: (module, arguments of its ``main``, output folder).
EXAMPLES = (
    ("stability", [], "stability"),
    ("binary_classifier", ["--quiet"], "binary"),
    ("multilabel_classifier", ["--quiet", "--missing-fraction", "0.3"], "multilabel"),
    ("imbalanced", ["--quiet"], "imbalanced"),
    ("siglip", ["--quiet"], "siglip"),
)


def _write_if_changed(path: Path, text: str) -> None:
    """Keeps the mtime of unchanged pages, so incremental builds reread only new ones."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _directive(obj: object) -> str:
    if inspect.isclass(obj):
        return "autoclass"
    if callable(obj):
        return "autofunction"
    return "autodata"


def write_api_pages(app: Sphinx) -> None:
    api = Path(app.srcdir) / API_DIR
    api.mkdir(exist_ok=True)
    names = list(jaxbce.__all__)
    for name in names:
        directive = _directive(getattr(jaxbce, name))
        title = name.replace("_", r"\_")
        text = f"{title}\n{'=' * len(title)}\n\n.. {directive}:: jaxbce.{name}\n"
        _write_if_changed(api / f"{name}.rst", text)
    for stale in api.glob("*.rst"):  # names removed from __all__
        if stale.stem not in names and stale.stem != "index":
            stale.unlink()
    index = API_INTRO.format(
        entries="\n".join(f"   {name}" for name in names),
        toc="\n".join(f"   {name}" for name in names),
    )
    _write_if_changed(api / "index.rst", index)


def check_api_pages(app: Sphinx, env) -> None:
    """Every name in ``__all__`` has its page, and that page documents it."""
    documented = env.get_domain("py").objects
    missing = [
        name
        for name in jaxbce.__all__
        if f"{API_DIR}/{name}" not in env.found_docs or f"jaxbce.{name}" not in documented
    ]
    if missing:
        raise ExtensionError(f"jaxbce.__all__ names without an API page: {missing}")


def link_outside_files(app: Sphinx, doctree: nodes.document) -> None:
    """MyST reads ``[text](../x/results.md)`` as a page reference because of the suffix;
    when the file lies outside the source folder and exists, link to the file instead."""
    env = app.env
    srcdir = Path(app.srcdir).resolve()
    for ref in list(doctree.findall(addnodes.pending_xref)):
        if ref.get("reftype") != "myst" or ref.get("refdomain") != "doc":
            continue
        target = ref["reftarget"]
        if target in env.found_docs:
            continue
        for suffix in app.config.source_suffix:
            path = Path(target + suffix)
            if path.is_absolute() and path.is_file() and srcdir not in path.resolve().parents:
                break
        else:
            continue  # a missing page: MyST warns, and -W fails the build
        docdir = Path(env.doc2path(env.docname)).parent
        download = addnodes.download_reference(
            "",
            "",
            *ref.children,
            refdoc=env.docname,
            reftarget=os.path.relpath(path, docdir),
            refexplicit=True,
            classes=["xref", "download", "myst"],
        )
        ref.replace_self(download)


_FORWARD_REF = re.compile(r"TypeAliasForwardRef\('([\w.]+)'\)")


def short_type_aliases(app, what, name, obj, options, signature, return_annotation):
    """``ArrayLike | None``, not ``TypeAliasForwardRef('ArrayLike') | None``: autodoc
    (Sphinx 9.0) prints an alias of ``autodoc_type_aliases`` by its repr inside a union."""
    if signature is None:
        return None
    unwrap = functools.partial(_FORWARD_REF.sub, r"\1")
    return unwrap(signature), return_annotation and unwrap(return_annotation)


def _sources_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted([*root.glob("examples/*.py"), *root.glob("jaxbce/*.py")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _split_wide_table(text: str) -> str:
    """``stability.py`` prints one 124-character table, ``y z | 4 losses | 4 gradients``
    (a header, a rule of dashes, the rows); this makes it two tables that fit a page.
    Any other text is returned as it is."""
    lines = text.splitlines()
    head = next((i for i, line in enumerate(lines) if line.count("|") == 2), None)
    if head is None or head + 1 == len(lines) or set(lines[head + 1]) != {"-"}:
        return text
    end = head + 2
    while end < len(lines) and lines[end].count("|") == 2:
        end += 1
    rows = [lines[head].split("|"), *(line.split("|") for line in lines[head + 2 : end])]
    tables = []
    for group in (1, 2):
        block = [f"{row[0]}|{row[group]}".rstrip() for row in rows]
        tables += [block[0], "-" * max(map(len, block)), *block[1:], ""]
    return "\n".join([*lines[:head], *tables[:-1], *lines[end:]]).rstrip("\n") + "\n"


def generate_example_outputs(app: Sphinx) -> None:
    """Runs the examples into ``_generated/<folder>``: their figures and, in
    ``output.txt``, what they print."""
    root = Path(app.srcdir).parent
    out = Path(app.srcdir) / GENERATED_DIR
    stamp = out / "sources.sha256"
    digest = _sources_digest(root)
    if stamp.exists() and stamp.read_text() == digest:
        return
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    examples = str(root / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    for module_name, args, folder in EXAMPLES:
        logger.info(f"jaxbce_docs: running examples/{module_name}.py")
        module = importlib.import_module(module_name)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            module.main([*args, "--out", str(out / folder)])
        # Paths as the README's ``--out out`` would print them, not this machine's.
        text = printed.getvalue().replace(str(out), "out")
        (out / folder / "output.txt").write_text(_split_wide_table(text))
    stamp.write_text(digest)


def setup(app: Sphinx) -> dict:
    app.connect("builder-inited", write_api_pages)
    app.connect("builder-inited", generate_example_outputs)
    app.connect("env-updated", check_api_pages)
    app.connect("autodoc-process-signature", short_type_aliases)
    # Before the download collector (priority 500) registers the files to copy.
    app.connect("doctree-read", link_outside_files, priority=400)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
