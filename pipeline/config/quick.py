"""The first look at a command line, before any heavy import (Parsl, ASE, torch).

A typo in a file name should be answered at once, not after a second or more of
imports: :func:`first_look` finds the site file (and its unedited placeholders), the
campaign files with the standard library alone. The
full checks come after, in :mod:`palflow.pipeline.config.preflight`; these helpers
are the ones they use too, so each message is spelled once.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import tomllib
from pathlib import Path
from typing import Any

from palflow.apps.errors import InputError, SettingsError

PLACEHOLDER = re.compile(r"\bYOUR_[A-Z0-9_]+\b")
"""How the shipped sites mark a value that must be edited."""

# The site configs shipped with palflow (palflow.site_configs), found by name from a
# checkout and after a plain install alike, without importing them.
SITE_DIR = Path(importlib.util.find_spec("palflow.site_configs").origin).parent


class SiteError(InputError):
    """A site config is missing, broken, or breaks the executor-label contract."""


class CampaignError(SettingsError):
    """A campaign file or setting is invalid; the message names the key and the fix."""


def shipped_sites() -> list[str]:
    """The file names of the site configs shipped in ``palflow.site_configs``."""
    return sorted(p.name for p in SITE_DIR.glob("*.py") if not p.name.startswith("_"))


def resolve_site_path(name: str) -> Path:
    """A path as given, else a file of ``site_configs/`` (``laptop`` or ``laptop.py``)."""
    given = Path(name)
    if given.is_file():
        return given.resolve()
    bundled = SITE_DIR / (name if name.endswith(".py") else f"{name}.py")
    if bundled.is_file():
        return bundled
    known = ", ".join(shipped_sites())
    raise SiteError(f"site {name!r} not found: give a file path or one of: {known}")


def read_campaign_file(path: str | Path) -> dict[str, Any]:
    """The TOML of a campaign file, or a :class:`CampaignError` saying what is wrong
    with the file itself (missing, unreadable, not TOML)."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CampaignError(f"{path}: campaign file not found") from None
    except (OSError, UnicodeDecodeError) as error:  # a folder, unreadable, binary
        raise CampaignError(f"{path}: not a readable campaign file: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise CampaignError(f"{path}: not valid TOML: {error}") from None


def placeholders(path: str | Path) -> list[str]:
    """One line per placeholder string (``YOUR_...``) left in the site file ``path``,
    naming its line and, where it is assigned to a name, the name."""
    path = Path(path)
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except SyntaxError:
        return []  # the import reports it, with its line
    docstrings = {  # a docstring or a bare string may name a placeholder: no value
        id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)
    }
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    for inner in ast.walk(node.value):
                        names[id(inner)] = target.id
    found = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
            continue
        if id(node) in docstrings:
            continue
        what = f"{names[id(node)]} is still" if id(node) in names else "still holds"
        for placeholder in PLACEHOLDER.findall(node.value):
            found[node.lineno, placeholder] = (
                f"{path.name} line {node.lineno}: {what} the placeholder {placeholder!r}: "
                "edit it to your cluster's value"
            )
    return [found[key] for key in sorted(found)]


def refuse_placeholders(path: Path, site: str) -> None:
    """A :class:`SiteError` naming the first placeholder left in the site file ``path``
    (given as ``site``), if any."""
    left = placeholders(path)
    if left:
        raise SiteError(
            f"{path}: {len(left)} placeholder(s) left unedited, first {left[0]}; "
            f"`palflow check --site {site}` lists them all"
        )


def first_look(site: str | None, campaigns: list[str] | None) -> None:
    """The command line's site and campaign files exist and read; raises the
    :class:`InputError` the full checks would raise later, sooner."""
    if site is not None:
        refuse_placeholders(resolve_site_path(site), site)
    for campaign in campaigns or []:
        read_campaign_file(campaign)
