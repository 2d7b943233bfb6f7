"""The Python code blocks of README.md and docs/*.md, as the tests run them.

The convention (also in docs/layout.md, "Writing the docs"):

- every block fenced ```` ```python ```` (extra attributes such as ``title="..."`` allowed) runs,
  top to bottom, the blocks of one page sharing one namespace, in a fresh temporary directory;
- a block whose first line is ``# not run: <why>`` is shown but not run: it needs a GPU, hours of
  training or the reader's own model and data. The reason is required and must say which;
- other fences (``bash``, ``text``, ``pycon``, ...) are not run.

Blocks inside admonitions or list items are indented; the indentation of the opening fence is
removed from every line of the block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

NOT_RUN = "# not run:"
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.MULTILINE | re.DOTALL
)


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str

    @property
    def runs(self) -> bool:
        return self.language == "python" and not self.code.lstrip().startswith(NOT_RUN)

    @property
    def not_run_reason(self) -> str | None:
        first = self.code.lstrip().splitlines()[0] if self.code.strip() else ""
        return first[len(NOT_RUN) :].strip() if first.startswith(NOT_RUN) else None

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, in order."""
    text = path.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        indent = match["indent"]
        lines = match["body"].splitlines()
        code = "\n".join(line[len(indent) :] if line.startswith(indent) else line.lstrip() for line in lines)
        language = match["info"].strip().split(" ", 1)[0].split("{", 1)[0].strip()
        found.append(Block(path, text.count("\n", 0, match.start()) + 1, language, code + "\n"))
    return found


def run_page(path: Path, namespace: dict | None = None) -> dict:
    """Run the page's Python blocks in one namespace (each compiled under its file:line); return it."""
    namespace = {"__name__": "__main__"} if namespace is None else namespace
    for block in blocks(path):
        if block.runs:
            # Line numbers in tracebacks point into the Markdown file.
            padded = "\n" * block.line + block.code
            exec(compile(padded, str(path), "exec"), namespace)  # noqa: S102  (our own docs)
    return namespace
