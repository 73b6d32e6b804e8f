"""The command-line reference, docs/cli.md, generated from the Typer app (`make docs`).

The page is plain Markdown and deterministic: it walks the app's command tree
(``typer.main.get_command``) and writes, per command, its help text, its usage line and each
parameter's help record, the text ``--help`` shows, without terminal width, colour or Rich boxes. It
changes only when a command, a parameter, a default or a help text does. tests/test_docs.py fails when
docs/cli.md differs from what this writes, so help texts and defaults must not depend on the machine.

    python -m clotho_retrieve.cli_docs                 # write docs/cli.md
    python -m clotho_retrieve.cli_docs --check         # exit 1 when docs/cli.md is stale
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import typer

from clotho_retrieve.utils import atomic_write_text

PROG = "clotho-retrieve"
OUTPUT = Path("docs", "cli.md")
HEADER = (
    "<!-- Generated from clotho_retrieve/cli/ by `make docs` (python -m clotho_retrieve.cli_docs). "
    "Do not edit: change the help texts in the code and regenerate. -->\n"
)


def _plain(text: str) -> str:
    """What a Rich-markup help text shows (``rich_markup_mode="rich"``), without its styles."""
    from rich.errors import MarkupError
    from rich.text import Text

    try:
        return Text.from_markup(text).plain
    except MarkupError:
        return text


def _md(text: str) -> str:
    """Markdown-safe prose: a ``*`` or ``<`` in a help text is meant literally (``*.wav``, ``<= 64``)."""
    return re.sub(r"([\\*<])", r"\\\1", text)


def _anchor(title: str) -> str:
    """GitHub's anchor of a heading (lower case, punctuation dropped, spaces as hyphens)."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _summary(command) -> str:
    """The first line of a command's help (click's short help cuts at the first period, "1.")."""
    return _plain(command.help or "").strip().split("\n")[0]


def _subcommands(command, ctx) -> list:
    if not hasattr(command, "list_commands"):
        return []
    found = (command.get_command(ctx, name) for name in command.list_commands(ctx))
    return [c for c in found if c is not None and not c.hidden]


def _param_groups(command, ctx) -> list[tuple[str, list[str]]]:
    """(title, Markdown bullets) per group, as ``--help`` groups them: arguments, options, then one group
    per Rich help panel in order of appearance; ``--help`` itself is left out."""
    groups: dict[str, list[str]] = {"Arguments": [], "Options": []}
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None or list(param.opts) == ["--help"]:
            continue
        names, text = record
        if param.help and text.startswith(param.help):  # the help proper may hold markup, the rest not
            text = _plain(param.help) + text[len(param.help) :]
        line = f"* `{names}`" + (f": {_md(' '.join(text.split()))}" if text else "")
        if param.param_type_name == "argument":
            title = "Arguments"
        else:
            title = getattr(param, "rich_help_panel", None) or "Options"
        groups.setdefault(title, []).append(line)
    return [(title, lines) for title, lines in groups.items() if lines]


def _command_section(command, ctx, path: str, level: int) -> list[str]:
    lines = [f"{'#' * level} `{path}`", ""]
    help_text = _plain(command.help or "").strip()
    if help_text:
        lines += [_md(help_text), ""]
    usage = " ".join([path, *command.collect_usage_pieces(ctx)])
    lines += ["```", usage, "```", ""]
    for title, items in _param_groups(command, ctx):
        lines += [f"{title}:", "", *items, ""]
    children = _subcommands(command, ctx)
    if children and level > 1:
        lines += _command_table(children, path) + [""]
    for child in children:
        child_ctx = typer.Context(child, info_name=child.name, parent=ctx)
        lines += _command_section(child, child_ctx, f"{path} {child.name}", level + 1)
    return lines


def _command_table(children, path: str) -> list[str]:
    lines = ["| command | what it does |", "| --- | --- |"]
    for child in children:
        title = f"{path} {child.name}"
        lines.append(f"| [`{child.name}`](#{_anchor(title)}) | {_md(_summary(child))} |")
    return lines


def render(app: typer.Typer | None = None, prog: str = PROG) -> str:
    """The whole reference page for ``app`` (default: the clotho-retrieve app) as Markdown."""
    if app is None:
        from clotho_retrieve.cli import app
    root = typer.main.get_command(app)
    ctx = typer.Context(root, info_name=prog)
    lines = [HEADER, "# Command-line reference", ""]
    if root.help:
        lines += [_md(_plain(root.help).strip()), ""]
    lines += [f"Each section below is what `{prog} COMMAND --help` prints.", ""]
    children = _subcommands(root, ctx)
    if children:
        lines += _command_table(children, prog) + [""]
    usage = " ".join([prog, *root.collect_usage_pieces(ctx)])
    lines += ["```", usage, "```", ""]
    for title, items in _param_groups(root, ctx):
        lines += [f"{title}:", "", *items, ""]
    for child in children:
        child_ctx = typer.Context(child, info_name=child.name, parent=ctx)
        lines += _command_section(child, child_ctx, f"{prog} {child.name}", 2)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clotho_retrieve.cli_docs",
        description="Write (or --check) the CLI reference, docs/cli.md.",
    )
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"file to write (default {OUTPUT})")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file is stale")
    args = parser.parse_args(argv)
    text = render()
    current = args.output.read_text(encoding="utf-8") if args.output.is_file() else None
    if args.check:
        if current != text:
            print(f"{args.output} is stale; run make docs", file=sys.stderr)
            return 1
        return 0
    if current != text:
        atomic_write_text(args.output, text)
    print(f"wrote {args.output}" if current != text else f"{args.output} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
