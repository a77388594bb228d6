"""auto: choose a method's settings by validation accuracy, with not distilling among the choices.

A run of ``auto`` trains, for every regime and seed, one student per candidate setting (every
combination of ``grid``'s values of ``method``'s parameters, or the ``candidates`` listed), each
with the same initial weights, data and budget as the scratch twin. The distilled student is the
one — scratch twin included — with the best accuracy on the validation split, so an auto run is
never worse on validation than not distilling (a tie goes to scratch). The test split plays no
part in the choice. The pipeline does the search (``softkd.stages``); this file declares it.
"""

from __future__ import annotations

import itertools

from pydantic import Field, model_validator
from softkd.errors import ConfigError, SoftKDError
from softkd.methods.base import Method, MethodParams, method_class, method_params, register_method

MAX_CANDIDATES = 64


class AutoParams(MethodParams):
    method: str = "soft-target"
    """The method whose settings are searched: one teacher, its logits (soft-target, dkd or dist)."""
    grid: dict[str, list] = Field(default_factory=lambda: {"temperature": [2.0, 4.0, 8.0], "beta": [0.5, 0.9]})
    """Values of the method's parameters; each combination is one candidate."""
    candidates: list[dict] | None = None
    """Settings listed one by one instead of method and grid, each with its method's name
    (e.g. {name: dkd, temperature: 4}): to choose the method too."""

    @model_validator(mode="after")
    def _candidates_are_valid(self):
        settings = expand(self)  # each one validated as its method's parameters
        if not settings:
            raise ValueError("gives no candidate: list at least one value per grid parameter, or candidates")
        if len(settings) > MAX_CANDIDATES:
            raise ValueError(f"gives {len(settings)} candidates (at most {MAX_CANDIDATES}: each is a whole training "
                             "run per regime and seed); use fewer values")
        tags = [tag for tag, _ in settings]
        twice = sorted({t for t in tags if tags.count(t) > 1})
        if twice:
            raise ValueError(f"lists the same setting more than once: {', '.join(twice)}")
        return self


def expand(params: AutoParams) -> list[tuple[str, MethodParams]]:
    """Every candidate as (tag, validated method parameters); the tag names the setting in file
    names and the report, e.g. ``soft-target-temperature4-beta0.9``."""
    if params.candidates is not None:
        raw = [dict(c) for c in params.candidates]
    else:
        keys = list(params.grid)
        for key, values in params.grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid.{key} must be a list of values, e.g. [2, 4, 8]; got {values!r}")
        raw = [{"name": params.method, **dict(zip(keys, combo))}
               for combo in itertools.product(*(params.grid[k] for k in keys))]
    settings = []
    for spec in raw:
        name = spec.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"each candidate needs its method's 'name' (e.g. {{name: soft-target, temperature: 4}}); "
                             f"got {spec!r}")
        try:
            cls = method_class(name)
            if cls is Auto or cls.needs != "logits" or cls.teachers_needed != "one":
                raise ConfigError(f"method '{cls.name}' cannot be searched by auto, which compares methods that "
                                  "learn from one teacher's logits (soft-target, dkd, dist)")
            chosen = method_params(cls, **spec)
        except SoftKDError as exc:
            raise ValueError(str(exc).rstrip(".")) from None
        settings.append((_tag(cls.name, spec), chosen))
    return settings


def _tag(name: str, spec: dict) -> str:
    return "-".join([name, *(f"{k}{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{k}{v}"
                             for k, v in spec.items())])


@register_method
class Auto(Method):
    """Not a loss: a search over whole training runs that the pipeline carries out (``softkd run``).
    ``softkd.distill`` and ``softkd.fit`` cannot train with it."""

    name = "auto"
    aliases = ("tune",)
    summary = "the best by validation accuracy of scratch and a grid of a method's settings"
    Params = AutoParams
    searches = True

    def candidates(self) -> list[tuple[str, MethodParams]]:
        return expand(self.params)

    def forward(self, model, batch, **_):
        raise ConfigError("Method 'auto' is a search over whole training runs, not a loss: run it with `softkd run` "
                          "(or softkd.run_experiment), or give softkd.distill one method and its settings.")

    def describe(self) -> str:
        settings = self.candidates()
        return (f"the best on validation accuracy of the scratch twin and {len(settings)} settings "
                f"({', '.join(tag for tag, _ in settings)})")
