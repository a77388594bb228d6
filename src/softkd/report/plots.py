"""The report's figures, drawn with matplotlib from report.json and metrics.jsonl. Each function
returns PNG bytes (None when the run holds no data for it); report/html.py embeds them."""

from __future__ import annotations

import io
import statistics

import matplotlib

matplotlib.use("Agg")  # no display: reports are written on servers
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"teacher": "#555555", "scratch": "#d1495b", "distilled": "#00798c"}


def learning_curves(epochs: dict) -> bytes | None:
    """Validation accuracy per epoch of every student stage (one line per seed, the mean bold),
    one panel per labeled fraction. ``epochs``: report.curves.epoch_records' output."""
    by_fraction = {}
    for (kind, fraction, peer, seed), records in epochs.items():
        curve = [(e, r["val_accuracy"]) for e, r in sorted(records.items()) if r.get("val_accuracy") is not None]
        if curve:
            by_fraction.setdefault(fraction, {}).setdefault((kind, peer), []).append(curve)
    if not by_fraction:
        return None
    fractions = sorted(by_fraction, reverse=True)
    peers = sorted({peer for stages in by_fraction.values() for _, peer in stages})
    styles = {peer: ("-", "--", ":", "-.")[i % 4] for i, peer in enumerate(peers)}  # a cohort's peers apart
    fig, axes = plt.subplots(1, len(fractions), figsize=(4.2 * len(fractions), 3.2), squeeze=False, sharey=True)
    for ax, fraction in zip(axes[0], fractions):
        for (kind, peer), curves in sorted(by_fraction[fraction].items()):
            color = COLORS[kind]
            label = f"{kind}{' ' + peer if peer else ''}"
            for curve in curves:
                ax.plot(*zip(*curve), color=color, alpha=0.25, linewidth=0.8)
            mean = _mean_curve(curves)
            ax.plot(*zip(*mean), color=color, linewidth=2, label=label, linestyle=styles[peer])
        ax.set_title(f"{fraction:.0%} labels")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    return _png(fig)


def accuracy_bars(report: dict) -> bytes:
    """Teacher, scratch and distilled test accuracy per student and regime, error bars = std over seeds."""
    groups = [(f"{name}\n{regime}", r) for name, entry in report["students"].items()
              for regime, r in entry["regimes"].items()]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(groups) + 1.5), 3.4))
    kinds = [k for k in ("teacher", "scratch", "distilled") if k != "teacher" or "teacher" in report]
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        means = [100 * r[kind]["accuracy"]["mean"] for _, r in groups]
        stds = [100 * r[kind]["accuracy"]["std"] for _, r in groups]
        xs = [g + (i - (len(kinds) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, color=COLORS[kind], label=kind)
    low = min(100 * r[k]["accuracy"]["mean"] for _, r in groups for k in kinds)
    ax.set_ylim(max(0.0, low - 8), 100)
    ax.set_xticks(range(len(groups)), [g for g, _ in groups], fontsize=8)
    ax.set_ylabel("test accuracy %")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def accuracy_vs_latency(report: dict) -> bytes | None:
    """Each model's batch-1 latency (p50) against its test accuracy: the trade distillation buys."""
    speed = report.get("speed")
    if not speed:
        return None
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    if "teacher" in report and "teacher" in speed["models"]:
        ax.scatter(speed["models"]["teacher"]["batch1"]["p50_ms"], 100 * report["teacher"]["accuracy"],
                   s=60, color=COLORS["teacher"], label="teacher", marker="s")
    for name, entry in report["students"].items():
        timing = speed["models"].get(entry.get("model", name))
        if timing is None:
            continue
        for regime, r in entry["regimes"].items():
            for kind, marker in (("scratch", "o"), ("distilled", "^")):
                acc = r[kind]["accuracy"]
                ax.errorbar(timing["batch1"]["p50_ms"], 100 * acc["mean"], yerr=100 * acc["std"], fmt=marker,
                            color=COLORS[kind], capsize=3, label=f"{kind} ({name}, {regime})")
    ax.set_xscale("log")
    ax.set_xlabel(f"latency at batch 1, ms (p50, {speed['device']})")
    ax.set_ylabel("test accuracy %")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    return _png(fig)


def reliability(details: dict[str, dict]) -> bytes | None:
    """Reliability diagram: accuracy against confidence per bin, for each model's pooled bins
    (``details``: label → detail with a ``reliability`` entry). The diagonal is perfect calibration."""
    details = {k: d for k, d in details.items() if d and d.get("reliability")}
    if not details:
        return None
    fig, ax = plt.subplots(figsize=(3.8, 3.6))
    ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1)
    for label, detail in details.items():
        bins = detail["reliability"]
        points = [(c, a) for c, a in zip(bins["confidence"], bins["accuracy"]) if c is not None]
        kind = label.split()[0]
        ax.plot(*zip(*points), marker="o", markersize=3, color=COLORS.get(kind), label=label)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    return _png(fig)


def confusion_and_change(distilled: dict, scratch: dict, class_names=None) -> bytes | None:
    """The distilled student's confusion matrix (row-normalised, summed over seeds) beside the
    per-class accuracy change distilled − scratch, in points."""
    if not distilled or distilled.get("confusion") is None:
        return None
    counts = distilled["confusion"]
    n = len(counts)
    names = class_names or [str(i) for i in range(n)]
    rows = [[c / max(sum(row), 1) for c in row] for row in counts]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.6, 3.8), gridspec_kw={"width_ratios": [1.1, 1]})
    image = left.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    if n <= 20:
        left.set_xticks(range(n), names, fontsize=7)
        left.set_yticks(range(n), names, fontsize=7)
        for i in range(n):
            for j in range(n):
                if counts[i][j]:
                    left.text(j, i, f"{rows[i][j]:.2f}".lstrip("0"), ha="center", va="center", fontsize=5,
                              color="white" if rows[i][j] > 0.5 else "black")
    left.set_xlabel("predicted")
    left.set_ylabel("true")
    left.set_title("distilled: confusion (row-normalised)", fontsize=9)
    fig.colorbar(image, ax=left, fraction=0.046)
    change = [None if d is None or s is None else 100 * (d - s)
              for d, s in zip(distilled["per_class_accuracy"], scratch["per_class_accuracy"])]
    values = [c or 0.0 for c in change]
    right.bar(range(n), values, color=[COLORS["distilled"] if v >= 0 else COLORS["scratch"] for v in values])
    right.axhline(0, color="black", linewidth=0.8)
    if n <= 20:
        right.set_xticks(range(n), names, fontsize=7)
    right.set_xlabel("class")
    right.set_ylabel("points")
    right.set_title("per-class accuracy: distilled − scratch", fontsize=9)
    right.grid(axis="y", alpha=0.3)
    return _png(fig)


def cascade_curves(cascade: dict) -> bytes | None:
    """Validation accuracy of each student's cascade against its cost (student + deferred share ×
    teacher, as a share of the teacher's measured latency per sample), the chosen points marked."""
    students = cascade.get("students") or {}
    if not students:
        return None
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for role, entry in students.items():
        curve = entry["curve"]
        cost = [100 * c for c in curve["cost_of_teacher"]]
        acc = [100 * a for a in curve["accuracy"]]
        color = COLORS.get(role, "#333333")
        ax.plot(cost, acc, color=color, lw=1.4, label=f"{role} {entry['model']} first")
        if curve.get("chosen") is not None:
            i = curve["chosen"]
            ax.scatter([cost[i]], [acc[i]], color=color, s=36, zorder=3, edgecolor="black", linewidth=0.6)
    ax.axhline(100 * cascade["teacher"]["val_accuracy"], color=COLORS["teacher"], ls="--", lw=1,
               label=f"teacher {cascade['teacher']['model']} alone")
    low = min(100 * e["curve"]["accuracy"][0] for e in students.values())
    ax.set_ylim(max(0.0, low - 1), 100 * max(max(e["curve"]["accuracy"]) for e in students.values()) + 0.8)
    ax.set_xlim(0, 105)
    ax.set_xlabel(f"cost, % of the teacher's latency per sample ({cascade['latency']['threads']} thread(s))")
    ax.set_ylabel("validation accuracy %")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _png(fig)


def _mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    by_epoch = {}
    for curve in curves:
        for epoch, value in curve:
            by_epoch.setdefault(epoch, []).append(value)
    return [(e, statistics.fmean(v)) for e, v in sorted(by_epoch.items())]


def _png(fig) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
