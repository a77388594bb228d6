"""Errors a user can cause. Each message is one line: what was wrong, where, and how to fix it.

The CLI prints the message alone (no traceback unless ``SOFTKD_DEBUG=1``) and exits with code 2.
"""

from __future__ import annotations


class SoftKDError(Exception):
    """Base class of every error softkd raises for bad input."""


class ConfigError(SoftKDError):
    """A run configuration (YAML file, ``--set`` override or keyword argument) is invalid."""


class InfeasibleSoftTargetsError(SoftKDError):
    """Soft labels are not a probability distribution (non-finite, outside [0, 1], rows != 1)."""


class ShapeMismatchError(SoftKDError):
    """Teacher, student, labels or soft labels disagree on shapes or on the number of classes."""


class DataError(SoftKDError):
    """A dataset is empty, unreadable, or holds values it must not (labels out of range...)."""


class UnknownNameError(SoftKDError):
    """A model, dataset or method name is not registered."""


class TrainingError(SoftKDError):
    """Training cannot go on (a NaN or inf loss, for example)."""


class SoftKDWarning(UserWarning):
    """Something that works but is probably not what was meant (one line, with the fix); the CLI
    prints it as ``warning: ...``."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none), for
    one-line errors that wrap another library's."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
