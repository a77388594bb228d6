"""What a run shows: metrics.jsonl while it trains, then report.json (the data) rendered as
report.md and one self-contained report.html."""

from __future__ import annotations

from pathlib import Path

from softkd.errors import ConfigError
from softkd.utils import atomic_write_bytes, atomic_write_text


def render_reports(run_dirs: list[Path], out: Path | None = None, *, figures: bool = False) -> list[Path]:
    """report.md and report.html again from run directories' report.json (and metrics.jsonl).
    One run directory: written into it (``out``: elsewhere). Several: one comparison, rows pooled
    over their seeds, into ``out`` (default ``./softkd-report``). ``figures``: also each plot as a
    PNG file under ``figures/`` (one folder per run when there are several). Returns the files
    written."""
    from softkd.report.compare import comparison_markdown, comparison_rows, load_report
    from softkd.report.html import figures as figures_of
    from softkd.report.html import render_html
    from softkd.report.summary import markdown_section

    if not run_dirs:
        raise ConfigError("softkd report needs at least one run directory; e.g. softkd report runs/demo.")
    runs = [(Path(d), load_report(Path(d))) for d in run_dirs]
    names = [d.name for d, _ in runs]
    if len(set(names)) < len(names):  # sections are headed by folder name
        names = [str(d) for d, _ in runs]
    target = Path(out) if out is not None else (runs[0][0] if len(runs) == 1 else Path("softkd-report"))
    if target.exists() and not target.is_dir():
        raise ConfigError(f"The report folder {target} is an existing file; give --out a folder.")
    target.mkdir(parents=True, exist_ok=True)
    if len(runs) == 1:
        report = runs[0][1]
        markdown = f"# softkd report: {report['data']['name']}\n\n" + markdown_section(report)
        page = render_html(runs)
    else:
        rows = comparison_rows(list(zip(names, (r for _, r in runs))))
        markdown = "\n".join([f"# softkd report: {len(runs)} runs compared", "",
                              "Rows with the same data, teacher, method, student and regime are pooled over all "
                              "their seeds (test accuracy %, mean ± std).", "", comparison_markdown(rows), "",
                              *[line for r in rows for line in (r["words"], "")],
                              *[f"## {name}\n\n{markdown_section(r)}" for name, (_, r) in zip(names, runs)]])
        page = render_html(runs, comparison=rows)
    written = [target / "report.md", target / "report.html"]
    atomic_write_text(written[0], markdown)
    atomic_write_text(written[1], page)
    if figures:
        for name, (run_dir, report) in zip(names, runs):
            folder = target / "figures" / (name.replace("/", "_") if len(runs) > 1 else "")
            folder.mkdir(parents=True, exist_ok=True)
            for file_name, png, _ in figures_of(run_dir, report):
                atomic_write_bytes(folder / file_name, png)
                written.append(folder / file_name)
    return written
