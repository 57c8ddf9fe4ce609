"""The fenced code blocks of README.md and docs/*.md, for the tests that run them (test_docs, test_clip_benchmark)."""
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^( *)```([^\n`]*)\n(.*?)^\1```[ \t]*$", re.S | re.M)


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository, e.g. "docs/api.md"
    line: int  # line number of the opening fence
    lang: str  # the fence's info string: "python", "bash", "text", ...
    text: str

    @property
    def first_line(self):
        """What names a block in the tests' tables: its first non-blank line, stripped."""
        return next((line.strip() for line in self.text.splitlines() if line.strip()), "")

    @property
    def key(self):
        return self.page, self.first_line

    def __str__(self):
        return f"{self.page}:{self.line} ({self.lang}: {self.first_line[:60]!r})"


def pages():
    return ["README.md"] + sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))


def blocks(page=None):
    """Every fenced block, in page order then document order."""
    found = []
    for name in [page] if page else pages():
        text = (REPO / name).read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            indent = m.group(1)
            body = "".join(line[len(indent):] if line.startswith(indent) else line
                           for line in m.group(3).splitlines(keepends=True))
            found.append(Block(name, text.count("\n", 0, m.start()) + 1, m.group(2).strip(), body))
    return found


def find(page, first_line):
    """The block of `page` whose first line is `first_line` (fails loudly if the docs changed)."""
    matches = [b for b in blocks(page) if b.first_line == first_line]
    assert len(matches) == 1, f"{page}: expected one block starting {first_line!r}, found {len(matches)}"
    return matches[0]


def substitute(text, substitutions, where):
    """Apply (old, new) replacements; each must occur, so a stale one fails instead of silently doing nothing."""
    for old, new in substitutions:
        assert old in text, f"{where}: substitution {old!r} no longer matches the block; update the test's table"
        text = text.replace(old, new)
    return text


def commands(text):
    """The shell commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def words(command):
    """shlex words of one command, with `[--optional flag]` brackets removed."""
    return [w.strip("[]") for w in shlex.split(command, comments=True) if w.strip("[]")]
