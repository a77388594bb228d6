"""What a run shows while it trains: tagged records appended to metrics.jsonl, the progress bar,
and TensorBoard event files when asked for. Only the main process of a data-parallel run writes or
draws anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from softkd.errors import ConfigError
from softkd.train.distributed import Distributed


def summary_writer():
    """torch's SummaryWriter class; a clear error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer needs the tensorboard package
        raise ConfigError("output.tensorboard is true but the 'tensorboard' package is not installed; "
                          "pip install 'softkd[tensorboard]' or set output.tensorboard: false.") from None
    return SummaryWriter


class RunLog:
    """Appends tagged records to metrics.jsonl, moves the progress bar and, with ``tensorboard``,
    writes the same figures as TensorBoard events (one event folder per job under
    ``tensorboard/``). Only the main process of a data-parallel run writes or draws anything."""

    def __init__(self, out: Path, progress, *, total: int, tensorboard: bool = False):
        main = Distributed().is_main
        self.file = (out / "metrics.jsonl").open("a") if main else None
        self.progress = progress if main else None
        self.task = self.progress.add_task("softkd", total=total) if self.progress is not None else None
        self.board = _Board(out / "tensorboard") if tensorboard and main else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()

    def bind(self, **tags):
        job = "-".join([tags["stage"]] + [v if isinstance(v, str) else f"{k.split('_')[0]}{v:g}"
                                          for k, v in tags.items() if k != "stage"])

        def log(record: dict) -> None:
            if self.file is None:
                return
            self.file.write(json.dumps({**tags, **record}) + "\n")
            self.file.flush()
            if self.board is not None:
                self.board.add(job, record)
            if self.progress is not None:  # the bar counts epochs; step records refresh the figures
                advance = 0 if record.get("kind") == "step" else 1
                self.progress.update(self.task, advance=advance, description=_describe_job(tags, record))
        return log

    def note(self, text: str) -> None:
        """One line for the user (on the main process), above the progress bar."""
        if self.file is None:
            return
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr)

    def skip(self, epochs: int, description: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=epochs, description=description)


class _Board:
    """TensorBoard event files: one SummaryWriter per job (teacher, scratch-labels0.1-seed0, ...);
    step records go under ``step/``, epoch records under ``epoch/``, both against the optimizer step."""

    def __init__(self, folder: Path):
        self.folder, self.writer_class, self.writers = folder, summary_writer(), {}

    def add(self, job: str, record: dict) -> None:
        if job not in self.writers:
            self.writers[job] = self.writer_class(log_dir=str(self.folder / job))
        writer, group = self.writers[job], "step" if record.get("kind") == "step" else "epoch"
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch"):
                writer.add_scalar(f"{group}/{key}", value, global_step=record["step"])
        writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def _describe_job(tags: dict, record: dict) -> str:
    name = tags["stage"]
    if "seed" in tags:
        name += f" {tags['labeled_fraction']:.0%} labels seed {tags['seed']}"
    figures = [f"epoch {record['epoch']:>3}", f"loss {record.get('train_loss', float('nan')):.3f}"]
    if record.get("val_accuracy") is not None:
        figures.append(f"val acc {record['val_accuracy']:.3f}")
    figures.append(f"{record.get('images_per_s', 0):,.0f} img/s")
    return f"{name:<32} " + "  ".join(figures)
