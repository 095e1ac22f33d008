"""The documentation cannot drift from the code.

* ``mkdocs build --strict`` (a broken link, anchor, nav entry or API name fails);
* every ```python block of the README and of ``docs/**/*.md`` runs, and every
  ```bash block marked ``<!-- run -->``; one test per block, named by page and line
  (``test_code_block[docs/layer.md:42]``). The markers are described on the
  contributing page (``docs/contributing.md``, "Documentation");
* the command-line pages show what the commands print for ``--help``;
* the figures in ``docs/img/`` are what ``scripts/draw_figures.py`` draws.

    python -m pytest tests/test_docs.py -q
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINKED = ("demo.py", "scripts", "benchmarks")  # what a page's shell blocks see in their directory
SHELL_TIMEOUT_S = 180

FENCE = re.compile(r"^(`{3,})(\w*)[^\n]*$")
MARKER = re.compile(r"^<!--\s*(run|continue|skip)\s*(?::\s*(.*?))?\s*-->$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: str | None  # "run", "continue", "skip" or None
    reason: str  # the skip's reason

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT).as_posix()}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, each with the marker comment on the line before it."""
    lines = page.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2), i
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            j += 1
        prev = lines[start - 1].strip() if start else ""
        mm = MARKER.match(prev)
        blocks.append(Block(page, start + 1, lang, "\n".join(lines[start + 1:j]) + "\n",
                            mm.group(1) if mm else None, (mm.group(2) or "") if mm else ""))
        i = j + 1
    return blocks


def runnable(block: Block) -> bool:
    if block.lang == "python":
        return True
    return block.lang in ("bash", "sh", "shell") and block.marker == "run"


BLOCKS = [b for page in PAGES for b in code_blocks(page) if runnable(b)]


def test_markers_are_used_as_documented():
    """A marker on the wrong kind of block, or a skip without a reason, is an error."""
    for page in PAGES:
        for b in code_blocks(page):
            if b.marker == "run":
                assert b.lang in ("bash", "sh", "shell"), f"{b.name}: <!-- run --> on a {b.lang}"
            if b.marker in ("continue", "skip"):
                assert b.lang == "python", f"{b.name}: <!-- {b.marker} --> on a {b.lang} block"
            if b.marker == "skip":
                assert b.reason, f"{b.name}: <!-- skip: REASON --> needs its reason"


# --- running the blocks -------------------------------------------------------------------

_namespaces: dict[tuple[Path, int], dict] = {}  # (page, line of the block) -> namespace after it


def _page_dir(page: Path, tmp_path_factory) -> Path:
    """One directory per page, shared by its blocks, with the repository's pieces linked."""
    name = "docs-" + re.sub(r"\W", "_", page.relative_to(ROOT).as_posix())
    path = tmp_path_factory.getbasetemp() / name
    if not path.exists():
        path.mkdir()
        for item in LINKED:
            (path / item).symlink_to(ROOT / item)
    return path


def _chain(block: Block) -> list[Block]:
    """The block and the Python blocks before it that it continues, first to last."""
    python = [b for b in code_blocks(block.page) if b.lang == "python"]
    k = next(i for i, b in enumerate(python) if b.line == block.line)
    start = k
    while python[start].marker == "continue" and start > 0:
        start -= 1
    return python[start:k + 1]


def _run_python(block: Block, cwd: Path) -> None:
    chain = _chain(block)
    first = 0
    for i in range(len(chain) - 1, 0, -1):  # the latest namespace this chain already has
        if (block.page, chain[i - 1].line) in _namespaces:
            first = i
            break
    ns = (dict(_namespaces[(block.page, chain[first - 1].line)]) if first
          else {"__name__": "__docs__"})
    here = os.getcwd()
    os.chdir(cwd)  # files a block writes go to its page's directory
    try:
        for b in chain[first:]:
            exec(compile(b.code, b.name, "exec"), ns)
            _namespaces[(block.page, b.line)] = ns
    finally:
        os.chdir(here)


def _run_shell(block: Block, cwd: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=SHELL_TIMEOUT_S,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, (f"{block.name} exited {r.returncode}\n--- stdout\n"
                               f"{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}")


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_code_block(block: Block, tmp_path_factory):
    if block.marker == "skip":
        pytest.skip(f"{block.name}: {block.reason}")
    cwd = _page_dir(block.page, tmp_path_factory)
    if block.lang == "python":
        _run_python(block, cwd)
    else:
        _run_shell(block, cwd)


# --- the site, the CLI pages, the figures -------------------------------------------------


def test_mkdocs_build_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                        "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]
    assert (tmp_path / "site" / "cli" / "train" / "index.html").exists()
    assert (tmp_path / "site" / "benchmarks" / "RESULTS" / "index.html").exists()


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_pages_show_the_commands_help():
    """The pages' help (captured in-process by the hook) is what the command prints."""
    cli_pages = _script("cli_pages")
    env = dict(os.environ, COLUMNS=str(cli_pages.COLUMNS), NO_COLOR="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "epmoe", "generate", "--help"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert cli_pages.help_text("generate") == r.stdout
    assert r.stdout in cli_pages.page("generate")


def test_figures_are_the_scripts(tmp_path):
    """docs/img/*.png are what scripts/draw_figures.py draws now (else: rerun it, commit)."""
    from matplotlib.image import imread

    for path in _script("draw_figures").main(tmp_path):
        committed = ROOT / "docs" / "img" / path.name
        assert committed.exists(), f"run python scripts/draw_figures.py: {committed} missing"
        drawn, kept = imread(path), imread(committed)
        assert drawn.shape == kept.shape and (drawn == kept).all(), \
            f"{committed} is not what scripts/draw_figures.py draws: rerun it and commit"


def test_readme_links_exist():
    """The README is not part of the site: its relative links are checked here."""
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "#")):
            continue
        path = ROOT / target.split("#")[0]
        assert path.exists(), f"README.md links to {target}, which does not exist"
