"""The documentation: the settings reference matches the schema, the README stays short,
and every relative link of README.md and docs/*.md reaches a file and a heading."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
REFERENCE = DOCS / "settings.md"
REGENERATE = "python -m palflow.pipeline.config.reference --write"
MAX_README_LINES = 350


# ------------------------------------------------------------------------ helpers
def schema_names() -> set[str]:
    """Every setting of the campaign schema, dotted as written in TOML, found by walking
    the pydantic classes themselves (not through the reference module)."""
    from palflow.apps.models import registry
    from palflow.apps.models.backend import BackendSettings
    from palflow.pipeline.config.settings import Campaign

    fields = Campaign.model_fields
    single = {f.annotation: key for key, f in fields.items() if isinstance(f.annotation, type)}
    names = set()
    for key, field in fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BackendSettings):
            for name in registry.BUILTIN:
                names |= {f"{key}.{n}" for n in registry.backend(name).settings.model_fields}
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= {f"{key}.{n}" for n in annotation.model_fields}
        elif getattr(annotation, "__origin__", None) is list:
            (item,) = annotation.__args__
            if issubclass(item, BaseModel):  # [[systems]]: written like its single table
                names |= {f"{single.get(item, key)}.{n}" for n in item.model_fields}
        else:
            names.add(key)
    return names


def reference_rows(text: str) -> dict[str, list[str]]:
    """The settings of a reference text: dotted name -> the cells of each of its rows."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"^\| `([^`]+)` \|(.*)\|$", line)
        if match:
            cells = [cell.strip() for cell in match.group(2).split(" | ")]
            rows.setdefault(match.group(1), []).append(cells)
    return rows


def missing_from(text: str) -> list[str]:
    """Settings of the schema without a row in ``text``, or whose row says nothing."""
    rows = reference_rows(text)
    problems = [f"{name}: no row" for name in sorted(schema_names()) if name not in rows]
    for name, found in sorted(rows.items()):
        for cells in found:
            if len(cells) != 4 or not cells[-1]:
                problems.append(f"{name}: no meaning (give the field an attribute docstring)")
    return problems


def slug(heading: str) -> str:
    """The anchor GitHub makes of a heading: its text without Markdown code marks,
    lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code (their brackets are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """The heading anchors of the Markdown file ``path`` (repeats get ``-1``, ``-2``)."""
    found: set[str] = set()
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    for line in text.splitlines():
        match = re.match(r"^#{1,6} (.+?)#*\s*$", line)
        if match:
            base = slug(match.group(1))
            anchor, count = base, 0
            while anchor in found:
                count += 1
                anchor = f"{base}-{count}"
            found.add(anchor)
    return found


def broken_links(path: Path) -> list[str]:
    """Relative links and images of the Markdown file ``path`` that reach no file, or
    no heading of a Markdown file."""
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{path.name}: ({target}) reaches no file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{path.name}: ({target}) reaches no heading of {linked.name}")
    return problems


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# ------------------------------------------------------------------------ the tests
def test_the_settings_reference_is_what_the_schema_generates():
    from palflow.pipeline.config.reference import render

    assert REFERENCE.is_file(), f"docs/settings.md is missing: run `{REGENERATE}`"
    assert REFERENCE.read_text(encoding="utf-8") == render(), (
        f"docs/settings.md is out of date with the campaign schema: run `{REGENERATE}`"
    )


def test_every_setting_of_the_schema_has_a_row_that_says_what_it_means():
    assert missing_from(REFERENCE.read_text(encoding="utf-8")) == []
    # A few rows whose cells come from the schema's bounds, defaults and names.
    rows = reference_rows(REFERENCE.read_text(encoding="utf-8"))
    (max_labels,) = rows["stop.max_labels"]
    assert max_labels[:3] == ["int, ≥ 0", "`300`", ""]
    (timeout,) = rows["oracle.timeout_s"]
    assert timeout[1:3] == ["`1800.0`", "s"]
    (max_force,) = rows["oracle.max_force"]
    assert max_force[2] == "eV/Å"
    (energy_weight,) = rows["training.energy_weight"]
    assert energy_weight[2] == "", "a weight has no unit, though its docstring names eV/atom"
    from palflow.apps.models import registry

    assert len(rows["model.name"]) == len(registry.BUILTIN), "one [model] table per backend"


def test_the_reference_check_finds_a_missing_setting_and_an_empty_meaning():
    from palflow.pipeline.config.reference import render

    text = render()
    rows = text.splitlines()
    without = "\n".join(row for row in rows if not row.startswith("| `stop.max_labels` |"))
    assert missing_from(without) == ["stop.max_labels: no row"]
    emptied = re.sub(r"(\| `seed` \|.*\| )[^|]+( \|)$", r"\1\2", text, flags=re.M)
    assert missing_from(emptied) == ["seed: no meaning (give the field an attribute docstring)"]


def test_the_readme_is_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines, more than {MAX_README_LINES}: move detail to docs/"
    )


def test_the_readme_gives_the_command_ci_runs():
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command.startswith("bash .ci/setup.sh --system")
    assert f"    {command}\n" in README.read_text(encoding="utf-8"), (
        "README.md must give the test command exactly as .ci/run runs it"
    )


def test_every_relative_link_reaches_a_file_and_a_heading():
    problems = [problem for path in markdown_files() for problem in broken_links(path)]
    assert problems == []
    assert len(markdown_files()) >= 8, "README.md and the docs/ files"


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text(
        "# Title\n\n## The `palflow` command\n\n## Sites\n## Sites\n"
    )
    page = tmp_path / "page.md"
    page.write_text(
        "## Here\n\n"
        "[ok](other.md#the-palflow-command), [ok](other.md#sites-1), [ok](#here),\n"
        "[split\nacross lines](other.md#title), ![image](other.md), [web](https://example.org)\n"
        "[gone](missing.md), [no heading](other.md#nowhere), [self](#elsewhere)\n"
        "`[not a link](missing.md)`\n\n```\n[not a link](missing.md)\n```\n"
    )
    assert broken_links(page) == [
        "page.md: (missing.md) reaches no file",
        "page.md: (other.md#nowhere) reaches no heading of other.md",
        "page.md: (#elsewhere) reaches no heading of page.md",
    ]
