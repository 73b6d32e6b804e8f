"""Command-line options generated from the config dataclasses, so each setting is defined once.

    @command("train")
    @config_options(train_cfg=Fields(TrainConfig, required=("out",)), model_cfg=Fields(ModelConfig))
    def train_cmd(train_cfg: TrainConfig, model_cfg: ModelConfig) -> None: ...

gives ``train`` one option per field (``--batch-size``, ...) with the field's default and
``metadata["help"]``, shown in a help panel per dataclass, and calls the command with the built
instances. The command's own parameters stay options as usual. On the command line a boolean is
``--x/--no-x``, a tuple a comma-separated string, and an optional setting takes ``none`` for None.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass

import typer

NONE_WORDS = ("", "none")  # what an optional setting (`str | None`) takes for None on the command line


@dataclass(frozen=True)
class Fields:
    """The fields of a config dataclass a command offers as options."""

    cls: type
    exclude: tuple[str, ...] = ()  # not options: the dataclass default is used
    required: tuple[str, ...] = ()  # options without a default on this command

    def fields(self) -> list[dataclasses.Field]:
        all_fields = dataclasses.fields(self.cls)
        unknown = (set(self.exclude) | set(self.required)) - {f.name for f in all_fields}
        if unknown:
            raise ValueError(f"{self.cls.__name__} has no fields {sorted(unknown)}")
        return [f for f in all_fields if f.metadata.get("cli", True) and f.name not in self.exclude]


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _optional_of(annotation) -> type | None:
    """``X | None`` -> X; anything else -> None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0]
    return None


def cli_type(annotation) -> type:
    """The type the command line parses for a field of this type (tuples: a comma-separated str)."""
    if typing.get_origin(annotation) is tuple:
        return str
    inner = _optional_of(annotation)
    if inner is not None:
        return inner | None
    return annotation


def cli_default(f: dataclasses.Field):
    """The field's default as the command line spells it (tuples comma-joined)."""
    if f.default is dataclasses.MISSING:
        return ...
    if isinstance(f.default, tuple):
        return ",".join(map(str, f.default))
    return f.default


def from_cli(value, annotation):
    """A parsed command-line value -> the field's value."""
    if typing.get_origin(annotation) is tuple:
        return tuple(s.strip() for s in value.split(",") if s.strip())
    optional = _optional_of(annotation) is not None
    if optional and isinstance(value, str) and value.strip().lower() in NONE_WORDS:
        return None
    return value


def given_options(ctx) -> set[str]:
    """Names of the parameters the user gave (on the command line or by environment), as opposed to
    those left at their defaults (``ctx``: the command's click context, a ``typer.Context``)."""
    given = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT"):
            given.add(name)
    return given


def panel(cls: type) -> str:
    return f"{cls.__name__.removesuffix('Config')} settings"


def option_parameter(f: dataclasses.Field, annotation, cls: type, required: bool) -> inspect.Parameter:
    """The typer option of one field, as a keyword parameter of the command's signature."""
    decls = option_name(f.name)
    if annotation is bool:
        decls += f"/--no-{f.name.replace('_', '-')}"
    default = ... if required else cli_default(f)
    option = typer.Option(default, decls, help=f.metadata.get("help", ""), rich_help_panel=panel(cls))
    kind = inspect.Parameter.KEYWORD_ONLY
    return inspect.Parameter(f.name, kind, default=option, annotation=cli_type(annotation))


def config_options(**targets: Fields) -> Callable:
    """Decorate a Typer command: its parameters named in ``targets`` receive built config instances,
    and the command gets one option per field of each (see the module docstring)."""

    def decorator(fn: Callable) -> Callable:
        own = [p for name, p in inspect.signature(fn).parameters.items() if name not in targets]
        generated: dict[str, list[tuple[str, object]]] = {}  # target -> [(field name, field type)]
        params: list[inspect.Parameter] = []
        for target, spec in targets.items():
            hints = typing.get_type_hints(spec.cls)
            generated[target] = []
            for f in spec.fields():
                params.append(option_parameter(f, hints[f.name], spec.cls, f.name in spec.required))
                generated[target].append((f.name, hints[f.name]))
        names = [p.name for p in own + params]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{fn.__name__}: options defined twice: {twice}")

        @functools.wraps(fn)
        def wrapper(**kwargs):
            for target, spec in targets.items():
                values = {name: from_cli(kwargs.pop(name), hint) for name, hint in generated[target]}
                kwargs[target] = spec.cls(**values)
            return fn(**kwargs)

        wrapper.__signature__ = inspect.Signature(own + params, return_annotation=None)
        own_hints = {p.name: fn.__annotations__[p.name] for p in own if p.name in fn.__annotations__}
        wrapper.__annotations__ = {**own_hints, **{p.name: p.annotation for p in params}}
        wrapper.config_targets = targets  # for tests and introspection
        return wrapper

    return decorator
