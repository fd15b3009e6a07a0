"""README.md and docs/*.md: every ```python block runs as written (in a fresh interpreter from the project's root),
and every relative link - to a file, a folder or a #heading, GitHub-style - resolves.

A block that cannot run on a machine without a server, TensorRT or a GPU is marked just above its fence with an HTML
comment that says why, ``<!-- not run: needs ... -->``. Such blocks are counted against ``NOT_RUN`` below, so that
leaving a block out of the tests is a visible, deliberate change.
"""

from __future__ import annotations

import re
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# page -> how many of its python blocks are marked `<!-- not run: ... -->`
NOT_RUN = {"docs/runtime.md": 1, "docs/serving.md": 1}

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")
NOT_RUN_COMMENT = re.compile(r"<!--\s*not run\b:?(.*?)-->", re.S)
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...


@dataclass
class Block:
    page: Path
    line: int        # 1-based line of the opening fence
    language: str
    code: str
    above: str       # the text between the previous block (or the page's start) and this fence

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def not_run(self) -> re.Match | None:
        """The `<!-- not run: why -->` comment right above the fence (nothing but blank lines in between)."""
        text = self.above.rstrip()
        if not text.endswith("-->"):
            return None
        start = text.rfind("<!--")
        return NOT_RUN_COMMENT.fullmatch(text[start:]) if start >= 0 else None


def split(page: Path) -> tuple[list[Block], str]:
    """The page's fenced blocks, and its text with every fenced block blanked out (same line count)."""
    lines = page.read_text().splitlines()
    blocks, prose, above, i = [], [], [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            prose.append(lines[i])
            above.append(lines[i])
            i += 1
            continue
        fence, language, start = opening.group(1), opening.group(2).lower(), i
        closing = re.compile(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$")
        i += 1
        while i < len(lines) and not closing.match(lines[i]):
            i += 1
        code = "\n".join(lines[start + 1:i]) + "\n"
        blocks.append(Block(page, start + 1, language, code, "\n".join(above)))
        prose.extend([""] * (min(i, len(lines) - 1) - start + 1))
        above = []
        i += 1
    return blocks, "\n".join(prose)


def without_code_spans(text: str) -> str:
    return re.sub(r"(`+)(.+?)\1", lambda m: " " * len(m.group(0)), text, flags=re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lower-cased, punctuation dropped (not `-` or `_`), spaces to `-`."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    kept = [c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM"]
    return "".join(kept).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in split(page)[1].splitlines():
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            found.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return found


def links(page: Path) -> list[tuple[int, str]]:
    prose = without_code_spans(split(page)[1])
    prose = re.sub(r"<!--.*?-->", lambda m: "\n" * m.group(0).count("\n"), prose, flags=re.S)
    return [(prose.count("\n", 0, m.start()) + 1, m.group(2)) for m in LINK.finditer(prose)]


def repository_files() -> set[str] | None:
    """Files git would commit (tracked, or untracked and not ignored); None outside a git checkout."""
    result = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    return set(result.stdout.splitlines()) if result.returncode == 0 else None


PYTHON_BLOCKS = [b for page in PAGES for b in split(page)[0] if b.language in ("python", "py")]
TO_RUN = [b for b in PYTHON_BLOCKS if b.not_run is None]


def test_the_pages_are_the_readme_and_the_docs():
    names = {str(p.relative_to(ROOT)) for p in PAGES}
    assert {"README.md", "docs/method.md", "docs/build.md", "docs/ENGINE_FORMAT.md", "docs/runtime.md",
            "docs/serving.md", "docs/client.md", "docs/tensorrt-jetson.md", "docs/benchmarks.md",
            "docs/development.md", "docs/reference-model.md"} <= names
    assert len(TO_RUN) >= 8


@pytest.mark.parametrize("block", TO_RUN, ids=[b.name for b in TO_RUN])
def test_a_python_block_runs_as_written(block, int8_engines, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(block.code)
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the block at {block.name} fails:\n{block.code}\n{result.stderr[-3000:]}"


def test_blocks_left_out_say_why_and_are_counted():
    left_out: dict[str, int] = {}
    for block in PYTHON_BLOCKS:
        if block.not_run is not None:
            reason = block.not_run.group(1).strip()
            assert len(reason) >= 8, f"{block.name}: say why the block is not run (<!-- not run: needs ... -->)"
            page = str(block.page.relative_to(ROOT))
            left_out[page] = left_out.get(page, 0) + 1
    print(f"python blocks run: {len(TO_RUN)}; not run: {sum(left_out.values())} {left_out}")
    assert left_out == NOT_RUN, "a block was left out of (or put back into) the tests: update NOT_RUN"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_a_not_run_comment_is_only_ever_above_a_python_block(page):
    blocks, prose = split(page)
    marked = sum(1 for b in blocks if b.not_run is not None and b.language in ("python", "py"))
    comments = len(NOT_RUN_COMMENT.findall(without_code_spans(prose)))
    assert comments == marked, f"{page.name}: a `<!-- not run -->` comment that is not right above a python block"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    files = repository_files()
    broken = []
    for line, target in links(page):
        if EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / unquote(path_part)).resolve() if path_part else page
        where = f"{page.relative_to(ROOT)}:{line}: {target}"
        if not path.exists():
            broken.append(f"{where} (no such file)")
            continue
        if ROOT not in path.parents and path != ROOT:
            broken.append(f"{where} (outside the repository)")
            continue
        relative = path.relative_to(ROOT).as_posix()
        if files is not None and path.is_file() and relative not in files:
            broken.append(f"{where} (not in the repository: ignored by git)")
        if files is not None and path.is_dir() and not any(f.startswith(relative + "/") for f in files):
            broken.append(f"{where} (a folder with nothing in the repository)")
        if anchor:
            if path.suffix != ".md":
                broken.append(f"{where} (an anchor into a file that is not Markdown)")
            elif anchor not in anchors(path):
                broken.append(f"{where} (no heading with that anchor in {path.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_checker_knows_githubs_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Build: `python -m ume_edge.build`\n## Where a served request's time goes\n## Notes\n"
                    "## Notes\n```bash\n# not a heading\n```\n## [Linked](x.md) *heading*\n")
    assert anchors(page) == {"build-python--m-ume_edgebuild", "where-a-served-requests-time-goes", "notes",
                             "notes-1", "linked-heading"}
    page.write_text("see [a](b.md#c) and `[not](a link)`\n```\n[nor](this)\n```\n<!-- [nor](that) -->\n")
    assert links(page) == [(1, "b.md#c")]
