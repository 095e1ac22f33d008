"""The CLI reference pages: one per ``python -m epmoe`` command, its ``--help`` text.

As an mkdocs hook (``mkdocs.yml``: ``hooks``) it adds ``cli/index.md`` and
``cli/<command>.md`` to every build, so the pages cannot go stale. The help is
the real command's: ``epmoe.cli.main([command, "--help"])``, captured in this
process at a fixed width of ``COLUMNS`` characters. Run alone it prints a page::

    python scripts/cli_pages.py train
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

# the repository's epmoe, also when mkdocs runs this file as a hook from elsewhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLUMNS = 88  # argparse wraps help to the terminal width; fixed so pages do not change


def help_text(command: str | None) -> str:
    """What ``python -m epmoe [command] --help`` prints, at ``COLUMNS`` characters."""
    from epmoe import cli

    argv = [command, "--help"] if command else ["--help"]
    saved = {k: os.environ.get(k) for k in ("COLUMNS", "NO_COLOR")}
    os.environ.update(COLUMNS=str(COLUMNS), NO_COLOR="1")
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            cli.main(argv)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out.getvalue()


def page(command: str | None) -> str:
    """The markdown page of one command (``None``: the index of all commands)."""
    from epmoe.cli import COMMANDS

    if command is None:
        rows = "\n".join(f"| [`{name}`]({name}.md) | {what} |" for name, what in COMMANDS.items())
        return ("# Command line\n\n`python -m epmoe <command>`, under `torchrun` for several "
                "ranks. Each page below shows the command's `--help`, generated at build "
                "time from the command itself.\n\n| command | what it does |\n| --- | --- |\n"
                f"{rows}\n\n```text\n{help_text(None)}```\n")
    return (f"# `python -m epmoe {command}`\n\n{COMMANDS[command]}.\n\n"
            f"```text\n{help_text(command)}```\n")


def on_files(files, config):
    """mkdocs hook: add the generated pages."""
    from mkdocs.structure.files import File

    from epmoe.cli import COMMANDS

    files.append(File.generated(config, "cli/index.md", content=page(None)))
    for name in COMMANDS:
        files.append(File.generated(config, f"cli/{name}.md", content=page(name)))
    return files


if __name__ == "__main__":
    print(page(sys.argv[1] if len(sys.argv) > 1 else None))
