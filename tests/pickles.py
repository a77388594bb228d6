"""A pickle that would run code: the safe-loading tests plant it and check that it never runs."""

from pathlib import Path

import torch


class RunsCode:  # unpickling this creates `marker`: softkd must never unpickle it
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def save_code_running_pickle(path, marker, key="weight"):
    torch.save({key: RunsCode(marker)}, path)
    return path
