"""A Griffe extension for the API reference: the reStructuredText bits of our docstrings, as Markdown.

The docstrings follow torchmetrics' convention: Google-style sections, with ``.. math::`` blocks and
``:math:`...```, ``:func:`...``` (and ``:class:``, ``:meth:``, ``:data:``, ``:mod:``, ``:attr:``)
roles. mkdocstrings renders Markdown, where those would show raw. This rewrites them before the
docstrings are parsed: math blocks and roles become ``$$ ... $$`` and ``$...$`` (rendered by
pymdownx.arithmatex and MathJax), the other roles inline code (``~module.Name`` shows ``Name``, as in
Sphinx). The source files are not touched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|meth|data|mod|attr):`~?([^`]+)`")
_TILDE_ROLE = re.compile(r":(?:func|class|meth|data|mod|attr):`~([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n(?P<body>(?:(?P=indent)[ \t]+\S.*\n|[ \t]*\n)+)", re.MULTILINE
)


def _math_block(match: re.Match[str]) -> str:
    indent = match["indent"]
    lines = match["body"].rstrip("\n").splitlines()
    body = "\n".join(f"{indent}{line.strip()}" for line in lines if line.strip())
    return f"{indent}$$\n{body}\n{indent}$$\n\n"


# "As input to update:" followed at once by indented "- item" lines (torchmetrics' layout): Markdown
# needs a blank line before a list, and indented items would read as a code block.
_TIGHT_LIST = re.compile(r"^(?P<lead>[^\n]*:)\n(?P<items>(?:[ \t]+- [^\n]*(?:\n|$))+)", re.MULTILINE)


def _loose_list(match: re.Match[str]) -> str:
    items = "".join(line.lstrip() + "\n" for line in match["items"].splitlines())
    return f"{match['lead']}\n\n{items}"


def rst_to_markdown(text: str) -> str:
    text = _MATH_BLOCK.sub(_math_block, text + "\n").rstrip("\n")
    text = _TIGHT_LIST.sub(_loose_list, text)
    text = _MATH_ROLE.sub(lambda m: f"${m[1]}$", text)
    text = _TILDE_ROLE.sub(lambda m: f"`{m[1].rsplit('.', 1)[-1]}`", text)
    return _ROLE.sub(lambda m: f"`{m[1]}`", text)


def _walk(obj: griffe.Object) -> None:
    if obj.docstring is not None:
        obj.docstring.value = rst_to_markdown(obj.docstring.value)
    for member in obj.members.values():
        if not member.is_alias:
            _walk(member)


class RstToMarkdown(griffe.Extension):
    """Rewrite the reStructuredText math and roles of every docstring in a loaded package."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        _walk(pkg)
