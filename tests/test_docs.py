"""The user documentation stays whole: links resolve inside the repository, every command,
option and attribute name is documented, and the man pages build from the parsers.

No mount needed; the man pages take about a second (argparse-manpage runs once per page).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tools import build_man
from vrangefs import cli, protocol

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_INDENTED_CODE = re.compile(r"^(?: {4}|\t).*$", re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]"  # [text] or ![alt], one level of nested brackets
    r"\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)"  # (target "optional title")
)
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
_HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']*)["']""", re.I)
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _prose(text: str) -> str:
    """The text without code blocks and inline code, where links are not links."""
    text = _FENCE.sub("", text)
    text = _INDENTED_CODE.sub("", text)
    return _INLINE_CODE.sub("", text)


def _links(path: Path) -> Iterator[str]:
    prose = _prose(path.read_text())
    for pattern in (_INLINE_LINK, _REFERENCE_LINK, _HTML_LINK):
        for match in pattern.finditer(prose):
            yield match[1]


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text())
    anchors: set[str] = set()
    for match in _HEADING.finditer(text):
        slug = _slug(match[1])
        n = 1
        unique = slug
        while unique in anchors:  # GitHub numbers repeated headings
            unique = f"{slug}-{n}"
            n += 1
        anchors.add(unique)
    return anchors


def _link_problem(source: Path, target: str) -> str | None:
    """Why *target*, linked from *source*, is not a file of this repository (None if it is)."""
    if not target:
        return "an empty link"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or target.startswith("//"):
        return "leaves the repository (a URL)"
    if parts.path.startswith("/"):
        return "an absolute path (it would not resolve in a clone)"
    resolved = (source.parent / unquote(parts.path)).resolve() if parts.path else source
    if not resolved.is_relative_to(REPO):
        return "leaves the repository"
    if not resolved.exists():
        return f"points to {resolved.relative_to(REPO)}, which does not exist"
    fragment = unquote(parts.fragment)
    if fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
        return f"has no heading #{parts.fragment} in {resolved.relative_to(REPO)}"
    return None


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_links_stay_in_the_repository_and_resolve(path: Path) -> None:
    problems = [
        f"{target}: {problem}"
        for target in _links(path)
        if (problem := _link_problem(path, target)) is not None
    ]
    assert not problems, f"bad links in {path.relative_to(REPO)}:\n" + "\n".join(problems)


def test_link_checker_catches_bad_links(tmp_path: Path) -> None:
    """The checker itself: each kind of bad link is caught, good ones pass."""
    source = DOCS / "README.md"
    assert _link_problem(source, "../shared/CONTRACT.md") is not None
    assert _link_problem(source, "../../outside.md") is not None
    assert _link_problem(source, "https://example.org/") is not None
    assert _link_problem(source, "/etc/passwd") is not None
    assert _link_problem(source, "missing.md") is not None
    assert _link_problem(source, "mounting.md#no-such-heading") is not None
    assert _link_problem(source, "mounting.md") is None
    assert _link_problem(source, "volatile-ranges.md#the-memory-cap") is None
    page = tmp_path / "page.md"
    page.write_text(
        "[a](x.md) ![b](y.png) <a href='w.md'>w</a> `[no](code.md)`\n"
        "[c]: z.md\n\n    [indented](code2.md)\n\n```\n[fenced](code3.md)\n```\n"
    )
    assert sorted(_links(page)) == ["w.md", "x.md", "y.png", "z.md"]


def test_readme_links_the_reference() -> None:
    assert "docs/README.md" in set(_links(README)), "README must link the user reference"


def test_the_index_links_every_page() -> None:
    linked = {(DOCS / urlsplit(target).path).resolve() for target in _links(DOCS / "README.md")}
    pages = {p.resolve() for p in DOCS.glob("*.md") if p.name != "README.md"}
    assert pages, "docs/ has no pages"
    unlinked = sorted(p.name for p in pages - linked)
    assert not unlinked, f"not linked from docs/README.md: {unlinked}"


# -- everything the parsers accept is documented ----------------------------------------------
def _docs_text() -> str:
    return "\n".join(p.read_text() for p in sorted(DOCS.rglob("*.md")))


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """The options a user may see (help and suppressed options left out)."""
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._HelpAction):
            continue
        yield action


def _undocumented(parser: argparse.ArgumentParser, text: str) -> list[str]:
    missing = []
    for action in _options(parser):
        missing += [o for o in action.option_strings if not _mentions(text, o)]
        for choice in action.choices or ():
            if not _mentions(text, str(choice)):
                missing.append(f"{action.option_strings[0]} {choice}")
    return missing


def test_every_command_and_option_is_documented() -> None:
    text = _docs_text()
    parser = cli.build_parser()
    commands = _subcommands(parser)
    assert {"mount", "umount", "volatile", "nonvolatile"} <= set(commands), "parser not walked"
    missing = [f"vrangefs {name}" for name in commands if f"vrangefs {name}" not in text]
    for name, sub in commands.items():
        missing += [f"vrangefs {name} {option}" for option in _undocumented(sub, text)]
    missing += _undocumented(parser, text)
    assert not missing, "not in docs/: " + ", ".join(missing)


def test_every_mount_helper_option_is_documented() -> None:
    text = _docs_text()
    parser = cli.build_mount_helper_parser()
    assert "mount.vrangefs" in text
    missing = _undocumented(parser, text)
    assert not missing, "mount.vrangefs options not in docs/: " + ", ".join(missing)


def test_every_attribute_name_is_documented() -> None:
    text = _docs_text()
    names = {
        value
        for value in vars(protocol).values()
        if isinstance(value, str)
        and value.startswith(protocol.XATTR_PREFIX)
        and value != protocol.XATTR_PREFIX
    }
    assert {protocol.VOLATILE, protocol.PURGED, protocol.STATS} <= names
    missing = sorted(name for name in names if not _mentions(text, name))
    assert not missing, "attribute names not in docs/: " + ", ".join(missing)


# -- the man pages ------------------------------------------------------------------------------
def _roff(option: str) -> str:
    return option.replace("-", r"\-")


@pytest.mark.parametrize("page", build_man.PAGES, ids=lambda p: p.filename)
def test_man_page_is_generated_from_its_parser(tmp_path: Path, page: build_man.Page) -> None:
    try:
        text = build_man.build_page(page, tmp_path).read_text()
    except build_man.BuildError as e:
        pytest.fail(f"{page.filename} does not build: {e}")
    title = f'.TH {page.name.upper()} "{page.section}"'
    assert text.startswith(title), text[:200]
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "FILES", "SEE ALSO"):
        assert re.search(rf'^\.SH "?{section}"?$', text, re.M), f"{page.filename}: no {section}"
    parser: argparse.ArgumentParser = getattr(cli, page.function)()
    parsers = [parser, *_subcommands(parser).values()]
    missing = [
        option
        for p in parsers
        for action in _options(p)
        for option in action.option_strings
        if _roff(option) not in text
    ]
    missing += [f"command {name}" for name in _subcommands(parser) if name not in text]
    assert not missing, f"{page.filename} lacks: {', '.join(missing)}"


def test_man_pages_have_no_text_line_read_as_a_request() -> None:
    fixed = build_man.escape_text_lines(".TP\n...and more\n'quoted\n.\\\" comment\n.B bold")
    assert fixed == ".TP\n\\&...and more\n\\&'quoted\n.\\\" comment\n.B bold"
