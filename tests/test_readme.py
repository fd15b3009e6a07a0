"""The README stays a short front page: under 8 KB, the two setup commands first and exactly as CI runs them, a quick
start, what was and was not run, and a link to every docs page. Its Python blocks run in tests/test_docs.py, with
every block of docs/."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()

SETUP = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e '.[build,serve,dev]' "
         "&& python -m ume_edge.build --precision int8")
TESTS = ". .venv/bin/activate && python -m pytest"


def test_the_readme_is_at_most_8_kb():
    assert len(README.read_bytes()) <= 8192, f"README.md is {len(README.read_bytes())} bytes: move detail to docs/"


def test_the_two_setup_commands_come_first_and_unchanged():
    before_any_section = TEXT.split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w*)\n(.*?)```", before_any_section, flags=re.S)
    assert [(language, code.strip()) for language, code in blocks] == [("bash", SETUP), ("bash", TESTS)]


def test_ci_installs_what_the_setup_command_installs_and_runs_the_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    installs = [shlex.split(line) for line in ci.splitlines() if line.startswith("pip install") and "-e" in line]
    setup_install = shlex.split(SETUP.split("&&")[2])
    assert [[word for word in words if word != "-q"] for words in installs] == [setup_install]
    assert "python -m pytest" in ci.splitlines()


def test_the_readme_has_its_sections():
    sections = re.findall(r"^## (.*)$", TEXT, flags=re.M)
    assert sections == ["What you get", "Quick start: `Pipeline`", "What was and was not run here", "Documentation"]
    assert TEXT.count("```python") >= 1


def test_the_readme_links_every_docs_page():
    linked = {Path(target).name for target in re.findall(r"\]\(docs/([^)#\s]+)", TEXT)}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"
