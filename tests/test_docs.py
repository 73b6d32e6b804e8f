"""The documentation: the generated CLI reference is current, and every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from clotho_retrieve import cli_docs

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_cli_reference_is_current(tmp_path):
    out = tmp_path / "cli.md"
    assert cli_docs.main(["--output", str(out)]) == 0
    committed = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    assert out.read_text(encoding="utf-8") == committed, "docs/cli.md is stale; run make docs"


def test_check_flags_a_stale_reference(tmp_path, capsys):
    out = tmp_path / "cli.md"
    assert cli_docs.main(["--check", "--output", str(out)]) == 1  # missing
    cli_docs.main(["--output", str(out)])
    assert cli_docs.main(["--check", "--output", str(out)]) == 0
    out.write_text(out.read_text(encoding="utf-8").replace("--top-k", "--top"), encoding="utf-8")
    assert cli_docs.main(["--check", "--output", str(out)]) == 1
    assert "stale; run make docs" in capsys.readouterr().err


def _toy_app() -> typer.Typer:
    app = typer.Typer(rich_markup_mode="rich", add_completion=False)

    @app.command("find")
    def find(
        text: str = typer.Argument(..., help="What to look for."),
        top_k: int = typer.Option(10, "--top-k", "-k", min=1, help="Results per [bold]query[/]."),
        paths: str = typer.Option("data/*.wav", "--paths", help="Files to search."),
        nprobe: int = typer.Option(16, "--nprobe", help="Cells to visit.", rich_help_panel="Tuning"),
        secret: bool = typer.Option(False, "--secret", hidden=True, help="Not shown."),
    ) -> None:
        """1. Rank clips for a text.

        Second paragraph.
        """

    @app.command("hidden-cmd", hidden=True)
    def hidden_cmd() -> None:
        """Never listed."""

    @app.command("other")
    def other() -> None:
        """Another command."""

    return app


def test_render_shows_what_help_shows_as_plain_markdown():
    page = cli_docs.render(_toy_app(), prog="toy")
    assert "| [`find`](#toy-find) | 1. Rank clips for a text. |" in page  # the whole first line
    assert "| [`other`](#toy-other) | Another command. |" in page
    assert "## `toy find`\n\n1. Rank clips for a text.\n\nSecond paragraph.\n" in page
    assert "```\ntoy find [OPTIONS] " in page
    assert "Results per query. [default: 10; x>=1]" in page  # Rich markup gone, default kept
    assert "Files to search. [default: data/\\*.wav]" in page  # a literal * stays a *
    assert "Arguments:\n\n* `text <str>`: What to look for. [required]" in page
    assert "Tuning:\n\n* `--nprobe <int>`: Cells to visit. [default: 16]\n" in page  # a help panel
    assert page.index("Options:") < page.index("--top-k <int range>") < page.index("Tuning:")
    assert "--secret" not in page and "hidden-cmd" not in page and "* `--help`" not in page
    assert "\x1b" not in page and "╭" not in page  # no colour, no boxes
    assert cli_docs.render(_toy_app(), prog="toy") == page  # deterministic


# ----------------------------------------------------------------------------------------------
# Links
# ----------------------------------------------------------------------------------------------
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code, where a [x](y) is not a link."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors of a Markdown text (duplicates get -1, -2, ...)."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        unique, n = slug, 0
        while unique in anchors:
            n += 1
            unique = f"{slug}-{n}"
        anchors.add(unique)
    return anchors


def test_anchor_and_link_rules():
    page = "# clotho-retrieve `query`\n## Speed: 2 x real time\n## Speed: 2 x real time\n```\n# not\n```\n"
    assert _anchors(page) == {"clotho-retrieve-query", "speed-2-x-real-time", "speed-2-x-real-time-1"}
    text = '[a](docs/a.md) `[b](b.md)` [c](https://x.org "t")\n```\n[d](d.md)\n```\n[e](#f)'
    assert LINK.findall(_prose(text)) == ["docs/a.md", "https://x.org", "#f"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    assert page.is_file(), f"{page} is missing"
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {', '.join(broken)}"
