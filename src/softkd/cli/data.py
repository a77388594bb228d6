"""Sub-commands for data and the soft-label cache: data fetch, cache build / verify / info."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from softkd.cli import _progress, _user_errors, app, command_group, console, load_user_config, set_help


data_app = command_group("data", "Datasets: fetch them into the user cache.", "fetch")
app.add_typer(data_app, name="data")


@data_app.command("fetch")
@_user_errors
def data_fetch(
    name: str = typer.Argument(..., metavar="NAME", help="fashion-mnist or mnist"),
    dest: Optional[Path] = typer.Option(None, help="Folder for the files; default ~/.cache/softkd/<name>."),
    base_url: Optional[str] = typer.Option(None, help="A mirror folder URL holding the same files."),
):
    """Download a dataset's files, verify their sha256, and resume a partial download.

    Example: softkd data fetch fashion-mnist
    """
    from softkd.data.download import fetch

    with _progress() as progress:
        tasks = {}

        def report(file_name, done, total):
            if file_name not in tasks:
                tasks[file_name] = progress.add_task(file_name, total=total)
            progress.update(tasks[file_name], completed=done)

        folder = fetch(name, dest, base_url=base_url, progress=report)
    console.print(f"{name}: files verified in {folder}", soft_wrap=True)


cache_app = command_group("cache", "The soft-label cache: the teacher's logits, computed once.",
                          "build, info or verify")
app.add_typer(cache_app, name="cache")


@cache_app.command("build")
@_user_errors
def cache_build(
    config: Path = typer.Argument(..., metavar="CONFIG", help="YAML run config (its data, teacher and cache sections)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=set_help("cache.dtype=fp32")),
    out: Optional[Path] = typer.Option(None, help="Run directory; default output.dir or runs/<config name>."),
):
    """Run the teacher once over the transfer set and store its raw logits (cache.dir, or the
    run directory's cache/) and, for method feature, its tapped features (<cache>/features/<path>/).
    An interrupted build resumes from its finished shards.

    Example: softkd cache build configs/soft-target-tinycnn16_from_resnet64-fashion-mnist.yaml
    """
    from softkd.pipeline import build_cache

    cfg = load_user_config(config, set_)
    with _progress() as progress:
        caches = build_cache(cfg, out_dir=out or Path(cfg.output.dir or Path("runs") / config.stem),
                             progress=progress)
    for cache in caches:
        _print_cache_info(cache.info())


@cache_app.command("verify")
@_user_errors
def cache_verify(folder: Path = typer.Argument(..., metavar="FOLDER", help="A cache folder (holding manifest.json).")):
    """Re-hash every shard against the manifest; a damaged shard is named (exit 2)."""
    from softkd.cache import SoftLabelCache

    cache = SoftLabelCache.open(folder)
    cache.verify()
    console.print(f"OK: {folder}: {len(cache.manifest['shards'])} shard(s) match their sha256.", soft_wrap=True)


@cache_app.command("info")
@_user_errors
def cache_info(folder: Path = typer.Argument(..., metavar="FOLDER", help="A cache folder (holding manifest.json).")):
    """Show what a cache holds and what it was built from."""
    from softkd.cache import SoftLabelCache

    _print_cache_info(SoftLabelCache.open(folder).info())


def _print_cache_info(info: dict) -> None:
    for key in ("folder", "samples", "classes", "views", "dtype", "top_k", "shards", "bytes", "bytes_per_sample",
                "version", "created"):
        console.print(f"{key:>16}: {info.get(key)}", highlight=False)
    fp = info.get("fingerprint", {})
    console.print(f"{'teacher_sha256':>16}: {fp.get('teacher_sha256')}", highlight=False)
    console.print(f"{'data':>16}: {fp.get('data')}", highlight=False)
