"""Several run directories (seeds, methods, recipes) in one table: rows with the same data,
teacher, method, student and regime are pooled over all their seeds, mean ± std."""

from __future__ import annotations

import json
from pathlib import Path

from softkd.errors import ConfigError
from softkd.report.summary import _mean_std, in_words, stats, verdict


def load_report(run_dir: Path) -> dict:
    """A run directory's report.json; a clear error when the folder holds none."""
    path = Path(run_dir) / "report.json"
    if not Path(run_dir).is_dir():
        raise ConfigError(f"Run directory {run_dir} does not exist; give the folder `softkd run` wrote "
                          "(it holds report.json).")
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no report.json: it is not a finished run directory "
                          "(run `softkd run CONFIG --out DIR` to completion first).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); rerun the run to "
                          "rewrite it.") from None


def comparison_rows(reports: list[tuple[str, dict]]) -> list[dict]:
    """One row per (data, teacher, method, student, regime) over all ``reports`` (name, report),
    each seed counted once (a seed found in two runs of the same settings is the same student)."""
    groups: dict[tuple, dict] = {}
    for run_name, report in reports:
        method = report["method"]
        teacher = report.get("teacher")
        for student, entry in report["students"].items():
            label = f"{student} ({entry['model']})" if "model" in entry else student
            for regime, r in entry["regimes"].items():
                key = (report["data"]["name"], teacher["model"] if teacher else None,
                       json.dumps({k: v for k, v in method.items() if k != "formula"}, sort_keys=True),
                       label, regime)
                group = groups.setdefault(key, {"runs": [], "scratch": {}, "distilled": {}, "teacher": None,
                                                "method": method["name"], "student": label, "regime": regime,
                                                "data": report["data"]["name"]})
                group["runs"].append(run_name)
                for kind in ("scratch", "distilled"):
                    for seed, value in zip(report["seeds"], r[kind]["accuracy"]["runs"]):
                        group[kind].setdefault(seed, value)
                if teacher:
                    group["teacher"] = teacher["accuracy"]
    rows = []
    for group in groups.values():
        seeds = sorted(set(group["scratch"]) & set(group["distilled"]))
        scratch = stats([group["scratch"][s] for s in seeds])
        distilled = stats([group["distilled"][s] for s in seeds])
        teacher = group["teacher"]
        gap = ((distilled["mean"] - scratch["mean"]) / (teacher - scratch["mean"])
               if teacher is not None and teacher > scratch["mean"] else None)
        entry = {"scratch": {"accuracy": scratch}, "distilled": {"accuracy": distilled}, "gap_recovered": gap,
                 **({"teacher": {"accuracy": {"mean": teacher}}} if teacher is not None else {})}
        rows.append({**{k: group[k] for k in ("data", "method", "student", "regime", "runs")}, "seeds": seeds,
                     "teacher": teacher, "scratch": scratch, "distilled": distilled, "gap_recovered": gap,
                     "verdict": verdict(scratch, distilled),
                     "words": in_words(group["student"], group["regime"], entry)})
    return rows


HEADERS = ["data", "method", "student", "regime", "seeds", "teacher", "scratch", "distilled", "gap rec.", "verdict"]


def comparison_cells(row: dict) -> list[str]:
    return [row["data"], f"`{row['method']}`", row["student"], row["regime"], str(len(row["seeds"])),
            "–" if row["teacher"] is None else f"{100 * row['teacher']:.1f}",
            _mean_std(row["scratch"]), _mean_std(row["distilled"]),
            "n/a" if row["gap_recovered"] is None else f"{100 * row['gap_recovered']:.0f}%", row["verdict"]]


def comparison_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    return "\n".join(lines + ["| " + " | ".join(comparison_cells(r)) + " |" for r in rows])
