"""mkdocs hook: the benchmark reports, and optional pages, in the site.

The scripts under ``benchmarks/`` write their reports there (``RESULTS.md``,
``SERVING.md``, ...), outside ``docs/``. This hook adds each report, and the
plots under ``benchmarks/results/``, to the site at the same relative paths
(``benchmarks/RESULTS.md``, ``benchmarks/results/x.png``), so the reports'
own relative links resolve and ``mkdocs build --strict`` checks them. Nothing
is copied on disk: a rerun benchmark is in the next build.

Pages that other work adds later (``OPTIONAL_PAGES``) stay out of the nav until
their file exists, so the strict build passes before and after.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
OPTIONAL_PAGES = ("gpu.md", "families.md")


def _drop_missing(nav: list, docs_dir: Path) -> list:
    """The nav without entries that name a missing optional page."""
    kept = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            entry = {next(iter(entry)): _drop_missing(value, docs_dir)}
        elif value in OPTIONAL_PAGES and not (docs_dir / value).exists():
            continue
        kept.append(entry)
    return kept


def on_config(config):
    config["nav"] = _drop_missing(config["nav"], Path(config["docs_dir"]))
    return config


def on_files(files, config):
    for report in sorted(BENCHMARKS.glob("*.md")):
        files.append(File.generated(config, f"benchmarks/{report.name}",
                                    abs_src_path=str(report)))
    for plot in sorted((BENCHMARKS / "results").glob("*.png")):
        files.append(File.generated(config, f"benchmarks/results/{plot.name}",
                                    abs_src_path=str(plot)))
    return files
