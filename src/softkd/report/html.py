"""report.html: one self-contained page (plots embedded as PNG data, inline style, no script, no
network access) with what report.md says, the trade in one line, and the figures."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from softkd.report import plots
from softkd.report.compare import HEADERS as COMPARISON_HEADERS
from softkd.report.compare import comparison_cells
from softkd.report.curves import epoch_records
from softkd.report.search import SEARCH_HEADERS, search_tables
from softkd.report.summary import (HEADERS, cascade_note, device_words, headlines_of, in_words, kernels_note,
                                   table_rows)

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 68rem;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.88rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.55rem; text-align: left; }
th { background: #f4f4f4; }
.headline { font-size: 1.15rem; font-weight: 600; color: #00798c; margin: 0.4rem 0; }
.words { margin: 0.3rem 0; }
figure { display: inline-block; margin: 0.6rem 1rem 0.6rem 0; vertical-align: top; }
figcaption { font-size: 0.82rem; color: #555; max-width: 34rem; }
img { max-width: 100%; }
.meta { font-size: 0.82rem; color: #555; }
pre { background: #f7f7f7; padding: 0.6rem; overflow-x: auto; font-size: 0.78rem; }
"""


def render_html(runs: list[tuple[Path, dict]], comparison: list[dict] | None = None) -> str:
    """The page for one run directory, or several (``comparison``: compare.comparison_rows first)."""
    title = ("softkd report: " + runs[0][1]["data"]["name"]) if len(runs) == 1 else \
        f"softkd report: {len(runs)} runs compared"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{_e(title)}</h1>"]
    if comparison:
        parts.append("<h2>Comparison</h2><p>Rows with the same data, teacher, method, student and regime are "
                     "pooled over all their seeds (mean ± std of test accuracy %).</p>")
        parts.append(_table(COMPARISON_HEADERS, [[c.strip("`") for c in comparison_cells(r)] for r in comparison]))
        parts += [f"<p class='words'>{_e(r['words'])}</p>" for r in comparison]
    for run_dir, report in runs:
        parts.append(_run_section(Path(run_dir), report, heading=len(runs) > 1))
    parts.append("</body></html>")
    return "\n".join(parts)


def _run_section(run_dir: Path, report: dict, *, heading: bool) -> str:
    teacher = report.get("teacher")
    seeds = len(report["seeds"])
    out = [f"<h2>{_e(run_dir.name)}</h2>" if heading else ""]
    out.append(f"<p>{'Teacher <b>' + _e(teacher['model']) + '</b>, method' if teacher else 'No teacher, method'} "
               f"<b>{_e(report['method']['name'])}</b>: {_e(report['method']['formula'])}. Test accuracy on "
               f"{report['data']['test']:,} samples of {_e(report['data']['name'])}, mean ± std over {seeds} seed(s); "
               "each distilled student is beside the same student trained from scratch with the same budget.</p>")
    headlines = headlines_of(report)
    for student, entry in report["students"].items():
        for regime, r in entry["regimes"].items():
            line = headlines.get(student, {}).get(regime)
            if line:
                out.append(f"<p class='headline'>Distilled {_e(student)} against the teacher, {_e(regime)}: "
                           f"{_e(line.removeprefix('student: '))}</p>")
            out.append(f"<p class='words'>{_e(in_words(student, regime, r))}</p>")
    out.append(_table(HEADERS, table_rows(report)))
    for sentence, rows in search_tables(report):
        out.append(f"<p class='words'>{_e(sentence)}</p>")
        out.append(_table(SEARCH_HEADERS, rows))
    if report.get("speed"):
        out.append(_speed_table(report["speed"]))
    if report.get("cascade"):
        c = report["cascade"]
        out.append(f"<p class='headline'>{_e(c['sentence'])}</p><p class='words'>{_e(c['comparison'])} "
                   f"{_e(cascade_note(c))}</p>")
    out += _figures(run_dir, report)
    hw, versions = report.get("hardware", {}), report.get("versions", {})
    out.append(f"<p class='meta'>Ran on {_e(device_words(hw))}, {_e(hw.get('precision', '?'))}; softkd "
               f"{_e(versions.get('softkd', '?'))}, torch {_e(versions.get('torch', '?'))}; created "
               f"{_e(report.get('created', '?'))}.{_e(kernels_note(hw))}</p>")
    out.append("<details><summary>Resolved config</summary><pre>"
               f"{_e(json.dumps(report.get('config', {}), indent=2))}</pre></details>")
    return "\n".join(out)


def figures(run_dir: Path, report: dict) -> list[tuple[str, bytes, str]]:
    """Every figure of one run's report: (file name, PNG bytes, caption)."""
    found = [("accuracy", plots.accuracy_bars(report),
              "Test accuracy, teacher / scratch / distilled; error bars: std over seeds.")]
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        found.append(("curves", plots.learning_curves(epoch_records(metrics)),
                      "Validation accuracy per epoch: thin lines are seeds, bold their mean."))
    found.append(("latency", plots.accuracy_vs_latency(report), "Accuracy against latency at batch 1 on this machine."))
    teacher = report.get("teacher")
    for student, entry in report["students"].items():
        for regime, r in entry["regimes"].items():
            details = {f"teacher {teacher['model']}": teacher.get("detail")} if teacher else {}
            details.update({f"scratch {student}": r["scratch"].get("detail"),
                            f"distilled {student}": r["distilled"].get("detail")})
            slug = f"{student}-{regime.split('%')[0]}pct"
            found.append((f"reliability-{slug}", plots.reliability(details),
                          f"Reliability, {student}, {regime} (seeds pooled): on the diagonal, confidence "
                          "matches accuracy."))
            found.append((f"classes-{slug}",
                          plots.confusion_and_change(r["distilled"].get("detail"), r["scratch"].get("detail")),
                          f"{student}, {regime}: the distilled student's confusions (seeds summed) and its "
                          "per-class accuracy minus the scratch student's."))
    if report.get("cascade"):
        found.append(("cascade", plots.cascade_curves(report["cascade"]),
                      "Cascade on the validation split: accuracy against cost; dots: the chosen thresholds."))
    return [(f"{name}.png", png, caption) for name, png, caption in found if png is not None]


def _figures(run_dir: Path, report: dict) -> list[str]:
    return [f"<figure><img alt='{_e(caption)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            f"<figcaption>{_e(caption)}</figcaption></figure>" for _, png, caption in figures(run_dir, report)]


def _speed_table(speed: dict) -> str:
    rows = []
    for name, m in speed["models"].items():
        ratio = speed.get("ratios", {}).get(name, {})
        rows.append([name, f"{m['params']:,}", f"{m['size_bytes'] / 1e6:.2f} MB",
                     f"{m['batch1']['p50_ms']:.2f} / {m['batch1']['p95_ms']:.2f}",
                     f"{m['batch256']['throughput_per_s']:,.0f}",
                     f"{ratio['batch1']:.1f}×" if ratio.get("batch1") else "–",
                     f"{ratio['batch256']:.1f}×" if ratio.get("batch256") else "–"])
    caption = (f"<p class='meta'>Speed on this machine ({_e(speed['device'])}; untrained copies of each "
               "architecture, random input): after warm-up, medians of repeated runs, the models taking turns in "
               "one process so that load from elsewhere falls on all alike.</p>")
    return caption + _table(["model", "params", "size", "batch 1 p50 / p95 ms", "batch 256 images/s",
                             "teacher ÷ model, batch 1", "batch 256"], rows)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _e(text) -> str:
    return html.escape(str(text), quote=True)
