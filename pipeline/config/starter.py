"""``palflow init``: a campaign file and a site to edit, in a folder of the user's.

    palflow init                    # campaign.toml and site.py (laptop) here
    palflow init my-study --site hpc

``campaign.toml`` lists every setting of the schema at its default, commented out,
with its unit and meaning (:mod:`palflow.pipeline.config.reference` reads them off
the schema): as written it *is* the embedded default campaign, and a user
uncomments what to change. ``site.py`` is a copy of a shipped site, to edit rather
than the shipped file (a placeholder left in it is refused by ``palflow run`` and
listed by ``palflow check``). Neither file is overwritten.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from palflow.apps.errors import InputError
from palflow.pipeline.config.sites import resolve_site_path, shipped_sites

CAMPAIGN_NAME = "campaign.toml"
SITE_NAME = "site.py"

HEADER = """\
# A palflow campaign: what to learn. Written by `palflow init`.
#
# Every setting is listed at its default, commented out: as written, this file is
# palflow's default campaign (ethanol with GFN2-xTB). Uncomment and edit what you
# change; a misspelt key is an error that names it. All settings, with their types
# and bounds: docs/settings.md in palflow's repository.
#
#   palflow check --site {site} --campaign {campaign}   # before the first run
#   palflow run --site {site} --campaign {campaign}
#
# Paths in this file (structures, test sets) are relative to this file's folder.
"""


def campaign_text(site: str = SITE_NAME, campaign: str = CAMPAIGN_NAME) -> str:
    """The commented campaign file: every table of the schema, every key at its
    default behind ``#``, its meaning (and unit) on the line above."""
    # Imported here: the schema loads ASE, and every `palflow` command imports this module.
    from palflow.apps.models.registry import DEFAULT
    from palflow.pipeline.config.reference import tables

    lines = [HEADER.format(site=site, campaign=campaign)]
    for table in tables():
        if table.key == "model" and f'"{DEFAULT}"' not in table.title:
            continue  # one backend's table; the others are in the reference
        if table.key == "system":  # [system] and [[systems]] share one class
            lines.append("# One system; several are [[systems]] tables with the same keys.")
        if table.key:
            lines.append(f"[{table.key}]")
        for row in table.rows:
            key = row.name.rpartition(".")[2]
            meaning = " ".join(row.meaning.replace("`", "").split())
            if row.unit:
                meaning += f" [{row.unit}]"
            lines += [f"# {text}" for text in textwrap.wrap(meaning, 86)] or []
            if row.default in ("unset", "required"):
                lines.append(f"# {key} =    ({row.default})")
            elif key == "name" and not table.key:
                lines.append(f"name = {row.default.strip('`')}")  # a campaign has a name
            else:
                lines.append(f"# {key} = {row.default.strip('`')}")
        lines.append("")
    return "\n".join(lines)


def write_starter(folder: str | Path = ".", site: str = "laptop") -> dict[str, Path]:
    """Write :data:`CAMPAIGN_NAME` and :data:`SITE_NAME` (a copy of the shipped site
    ``site``) into ``folder``, created if missing.

    Raises
    ------
    InputError
        When either file exists (nothing is overwritten, nothing written) or
        ``site`` is no shipped site.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file: give a folder for palflow init to write to")
    source = resolve_site_path(site)
    if source.parent != resolve_site_path("laptop").parent:
        known = ", ".join(shipped_sites())
        raise InputError(f"--site {site}: palflow init copies a shipped site, one of: {known}")
    targets = {"campaign": folder / CAMPAIGN_NAME, "site": folder / SITE_NAME}
    existing = [str(path) for path in targets.values() if path.exists()]
    if existing:
        raise InputError(f"{', '.join(existing)} already exist(s): palflow init overwrites nothing")
    folder.mkdir(parents=True, exist_ok=True)
    targets["campaign"].write_text(campaign_text())
    note = f"# Copied from palflow's {source.name} by `palflow init`: edit this copy.\n"
    targets["site"].write_text(note + source.read_text())
    return targets
