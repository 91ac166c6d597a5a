"""Sphinx configuration for the ckpt documentation.

Build it with ``sphinx-build -W -b html docs docs/_build/html`` (``pip install -e '.[docs]'``).
Warnings are errors and every cross-reference must resolve (``nitpicky``); nothing is
fetched from the network (no intersphinx), so names from torch and the standard library
are listed in ``nitpick_ignore_regex`` instead of being linked.
"""

from __future__ import annotations

import builtins
import os
import re
import sys
from pathlib import Path
from typing import Any, List, Optional

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

from ckpt import __version__  # noqa: E402

project = "ckpt"
author = "The ckpt authors"
copyright = "2026, The ckpt authors"
release = __version__
version = ".".join(__version__.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinxarg.ext",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"ckpt {release}"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}

nitpicky = True
_EXTERNAL = r"(torch|numpy|np|typing|typing_extensions|collections|pathlib|os|io|abc|argparse|enum|threading|" \
            r"concurrent|dataclasses|datetime|signal|types|fsspec|s3fs|safetensors|zlib|zipfile|pickle|" \
            r"contextlib|queue|tqdm|filelock|logging|json|functools|inspect|subprocess|socket|" \
            r"transformers|pytorch_lightning|lightning|lightning_fabric|ignite|accelerate|torchdata|botocore)(\..*)?"
nitpick_ignore_regex = [
    (r"py:.*", _EXTERNAL),
    (r"py:.*", r"(" + "|".join(n for n in dir(builtins) if not n.startswith("_")) + r")"),
    (r"py:.*", r"(Any|Optional|Union|List|Dict|Tuple|Set|Callable|Iterator|Iterable|Mapping|Sequence|"
               r"Sized|NoReturn|IO|BinaryIO|TypeVar|Protocol|Literal|PathLike|T|K|V|Self|MutableMapping|"
               r"Generator|ContextManager|AbstractContextManager|Hashable|Collection|FrameType|Type|"
               r"NamedTuple|Tensor|Module|Optimizer|Generator)"),
    (r"py:.*", r"nn\..*|dist\..*|DTensor|ProcessGroup|TCPStore|Path|PurePath|PosixPath|string|_pickle\..*"),
    (r"py:.*", r"ckpt(\.\w+)*\.[A-Z]|ckpt(\.\w+)*\._\w+|Which|preempt\.Option|(\w+\.)?PathLike"),  # type variables, private
    (r"py:class", r"Tree"),  # ckpt.storage.trees.Tree: a type alias (a Union), which autodoc cannot target
]
# Names documented twice (``ckpt.CheckpointRecord`` and its canonical ``ckpt.record.CheckpointRecord``)
# are the same object: an annotation that finds both is not ambiguous.
suppress_warnings = ["ref.python"]


def _defined_there(name: str) -> bool:
    """Is the documented ``name`` where its object is defined (not a module's re-export)?"""
    import importlib

    module, _, attr = name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        return False
    return getattr(obj, "__module__", None) == module


def _resolve_short_names(app: Any, env: Any, node: Any, contnode: Any) -> Optional[Any]:
    """Resolve an unqualified ``:class:`Name``` in a docstring to the one ckpt object of that name.

    Docstrings refer to their neighbours by short name (``:class:`Catalog```); Sphinx looks
    those up only in the current module. When exactly one documented object ends with
    ``.Name``, link to it; otherwise the reference stays broken (and ``-W`` fails the build).
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip(".~")
    domain = env.get_domain("py")
    matches = [name for name in domain.objects if name == target or name.endswith("." + target)]
    module, cls = node.get("py:module") or "", node.get("py:class") or ""
    tiers = [
        [n for n in matches if cls and n.startswith(f"{module}.{cls}.")],   # a method of this class
        [n for n in matches if module and n.startswith(f"{module}.")],       # a name of this module
        [n for n in matches if n.count(".") == target.count(".") + 1],      # a public ckpt.Name
        [n for n in matches if _defined_there(n)],                          # not a re-export
        matches,
    ]
    if not matches and "." in target:
        # a public name (``ckpt.ConfigError``) documented where it is defined (``ckpt.errors``),
        # or an annotation through a module alias (``opts.Options`` for ``ckpt.options.Options``)
        short = target.split(".")[-1]
        found = [n for n in domain.objects if n.startswith("ckpt.") and n.endswith("." + short)]
        tiers = [found, [n for n in found if _defined_there(n)]]
    chosen = next((tier for tier in tiers if len(tier) == 1), [])
    if not chosen:
        return None
    from sphinx.util.nodes import make_refnode
    obj = domain.objects[chosen[0]]
    return make_refnode(app.builder, node["refdoc"], obj.docname, obj.node_id, contnode, chosen[0])


class RemainingModules(SphinxDirective):
    """``.. ckpt-remaining-modules::``: ``automodule`` for every ckpt module the page does not list.

    Modules added later (by any change) are documented without editing the page, and a
    docstring's ``:mod:`` reference to them resolves.
    """

    option_spec = {"exclude": directives.unchanged}

    def run(self) -> List[Any]:
        import pkgutil

        import ckpt

        source = Path(self.env.doc2path(self.env.docname)).read_text()
        listed = set(re.findall(r"automodule:: (\S+)", source)) | set(self.options.get("exclude", "").split())
        names = [m.name for m in pkgutil.walk_packages(ckpt.__path__, "ckpt.")
                 if m.name not in listed and m.name not in ("ckpt.__main__", "ckpt._version")]
        lines = StringList()
        for name in sorted(names):
            for line in (f".. automodule:: {name}", "   :members:", "   :undoc-members:", ""):
                lines.append(line, "<ckpt-remaining-modules>")
        node = nodes.section()
        node.document = self.state.document
        nested_parse_with_titles(self.state, lines, node)
        return list(node.children)


def setup(app: Any) -> None:
    app.connect("missing-reference", _resolve_short_names)
    app.add_directive("ckpt-remaining-modules", RemainingModules)
