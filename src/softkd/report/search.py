"""What a search (method auto) chose and what it cost, per student and regime: every candidate's
validation accuracy over seeds, the choice for each seed, and the candidates' training time beside
the scratch twins' — the price of the search, not hidden. The test split plays no part in it."""

from __future__ import annotations

import statistics


def search_summary(distilled_runs: list[dict]) -> dict | None:
    """From the distilled runs of one regime (one per seed), each carrying the ``search`` the
    pipeline recorded; None when they were not chosen by a search."""
    searched = [r for r in distilled_runs if "search" in r]
    if not searched:
        return None
    settings = {}
    for r in searched:
        for c in r["search"]["candidates"]:
            settings.setdefault(c["setting"], {"method": c["method"], "val_accuracy": []})["val_accuracy"].append(
                c["val_accuracy"])
    train_s = sum(r["search"]["train_s"] for r in searched)
    scratch_s = sum(r["search"]["scratch_train_s"] for r in searched)
    return {
        "chosen": {str(r["seed"]): r["search"]["chosen"] for r in searched},
        "scratch_val_accuracy": _mean([r["search"]["scratch_val_accuracy"] for r in searched]),
        "settings": [{"setting": tag, "method": s["method"], "val_accuracy": _mean(s["val_accuracy"])}
                     for tag, s in settings.items()],
        "candidate_runs": sum(r["search"]["runs"] for r in searched),
        "candidate_train_s": train_s,
        "scratch_train_s": scratch_s,
        "cost_vs_scratch": train_s / scratch_s if scratch_s > 0 else None,
    }


SEARCH_HEADERS = ["setting", "val acc % (mean over seeds)"]


def search_tables(report: dict) -> list[tuple[str, list[list[str]]]]:
    """Each search as (sentence, rows): the choice per seed and the search's training time against
    the scratch twins', then every candidate's validation accuracy beside the scratch twin's."""
    found = []
    for student, entry in report["students"].items():
        for regime, r in entry["regimes"].items():
            s = r.get("search")
            if s is None:
                continue
            chosen = ", ".join(f"{tag} (seed {seed})" for seed, tag in s["chosen"].items())
            cost = s["cost_vs_scratch"]
            sentence = (f"Search, {student}, {regime}: chose {chosen} by validation accuracy; the test split "
                        f"played no part. The {s['candidate_runs']} candidate runs took "
                        f"{_seconds(s['candidate_train_s'])} of training"
                        + (f", {cost:.1f}× the scratch twins' {_seconds(s['scratch_train_s'])}." if cost else "."))
            rows = [["scratch (no distillation)", f"{100 * s['scratch_val_accuracy']:.2f}"],
                    *[[c["setting"], f"{100 * c['val_accuracy']:.2f}"] for c in s["settings"]]]
            found.append((sentence, rows))
    return found


def search_lines(report: dict) -> list[str]:
    """report.md's account of each search (see :func:`search_tables`)."""
    lines = []
    for sentence, rows in search_tables(report):
        head, _, rest = sentence.partition(": ")
        lines += [f"**{head}**: {rest}", "", "| " + " | ".join(SEARCH_HEADERS) + " |", "|---|---|",
                  *["| " + " | ".join(row) + " |" for row in rows], ""]
    return lines


def _seconds(x: float) -> str:
    return f"{x:.2f} s" if x < 10 else f"{x:.1f} s" if x < 100 else f"{x:.0f} s"


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)
