"""``python -m epmoe <command>`` (under torchrun for several ranks); see ``--help``."""

from .cli import main

main()
