"""Campaign settings: what to learn, typed and validated in one place.

Where the campaign runs (executors, nodes, slots) belongs to the site config, never
here. Every section forbids unknown keys, so a misspelt key is an error naming the
key instead of a silently ignored value.

The defaults describe the embedded campaign: ethanol with GFN2-xTB, sized to
finish within ten minutes on two CPU cores. A TOML file overrides any of them::

    [oracle]
    calculator = "ase.calculators.emt:EMT"

    [stop]
    max_labels = 300
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_serializer, model_validator

# The members' sections live in config/model_settings.py and apps/sections.py; re-exported here.
from palflow.apps.errors import SettingsError  # noqa: F401 (CampaignError's base)
from palflow.pipeline.config.model_settings import (  # noqa: F401
    DEFAULT_MODEL,
    ModelSettings,
    TrainingSettings,
    _Section,
)
from palflow.pipeline.config.quick import CampaignError, read_campaign_file
from palflow.pipeline.config.sections import (
    NAME_PATTERN,
    GeneratorSettings,
    InitialSettings,
    MetrologySettings,
    OracleSettings,
    SelectionSettings,
    StopSettings,
    SystemSettings,
    TestSetSettings,
    ValidateSettings,
)

logger = logging.getLogger(__name__)


# The [validate] section's field shadows pydantic's deprecated BaseModel.validate
# classmethod; on an instance the field wins, which is all palflow reads.
warnings.filterwarnings("ignore", message='Field name "validate"', category=UserWarning)


class Campaign(_Section):
    name: str = Field("ethanol-gfn2", pattern=NAME_PATTERN, max_length=100)
    """Names the run directory: a plain file name (letters, digits, ``_.-``)."""
    seed: int = Field(0, ge=0, lt=2**32)
    """Seed of the campaign's random numbers: the initial rattles, the held-out MD, each
    member's training, each generator task and the selection's random draws."""
    system: SystemSettings = SystemSettings()
    systems: list[SystemSettings] = []
    """Several systems in one campaign (``[[systems]]``); empty: ``[system]`` alone."""
    oracle: OracleSettings = OracleSettings()
    model: ModelSettings = DEFAULT_MODEL
    training: TrainingSettings = TrainingSettings()
    generator: GeneratorSettings = GeneratorSettings()
    selection: SelectionSettings = SelectionSettings()
    metrology: MetrologySettings = MetrologySettings()
    initial: InitialSettings = InitialSettings()
    test: TestSetSettings = TestSetSettings()
    stop: StopSettings = StopSettings()
    validate: ValidateSettings = ValidateSettings()

    @model_serializer(mode="wrap")
    def _one_way_of_systems(self, handler) -> dict[str, Any]:
        """Dump (``campaign.json``) ``[system]`` or ``[[systems]]``, whichever the
        campaign uses, so that the dump validates again on ``--resume``."""
        data = handler(self)
        data.pop("system" if self.systems else "systems", None)
        return data

    @model_validator(mode="after")
    def _one_way_to_give_systems(self) -> Campaign:
        if self.systems and "system" in self.model_fields_set:
            raise ValueError("give either [system] or [[systems]], not both")
        names = [system.name for system in self.systems]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"two systems are named {repeated[0]!r}: give each its own name")
        if self.stop.max_labels == 0 and not self.initial.file:
            raise ValueError(
                "stop.max_labels = 0 trains on initial.file's labels alone, and no "
                "initial.file is given: give a label budget of 1 or more, or initial.file"
            )
        return self

    @property
    def has_test_set(self) -> bool:
        """Whether the campaign labels (or reads) a held-out test set: ``test.file``,
        ``test.n_structures`` above 0, or every system's own ``test_file``."""
        return (
            bool(self.test.file)
            or self.test.n_structures > 0
            or all(system.test_file for system in self.all_systems())
        )

    def all_systems(self) -> list[SystemSettings]:
        """The campaign's systems: ``[[systems]]``, or the one ``[system]``."""
        return list(self.systems) or [self.system]

    def system_named(self, name: str) -> SystemSettings:
        """The system ``name`` (the first one for an empty name, as old runs have)."""
        for system in self.all_systems():
            if system.name == name:
                return system
        return self.all_systems()[0]

    def generator_for(self, system: SystemSettings) -> dict[str, Any]:
        """The generator section as ``system``'s walkers run it (its overrides applied)."""
        settings = self.generator.model_dump()
        if system.pressure_bar is not None:
            settings["pressure_bar"] = system.pressure_bar
        if system.generator is not None:
            settings["kind"] = system.generator
        return settings


_HINTS = {
    "finite_number": " (inf and nan mean nothing here; for no limit give a large number)",
    "string_pattern_mismatch": ": give a plain name of letters, digits and _.- (no path)",
}


def _describe(error: ValidationError, source: str) -> str:
    problems = error.errors()
    if len(problems) == 1 and not problems[0]["loc"]:  # a rule across sections
        return f"{source}: {problems[0]['msg'].removeprefix('Value error, ')}"
    lines = [_problem(item) for item in problems]
    if len(lines) == 1:  # one problem: one line
        return f"{source}: invalid campaign setting: {lines[0]}"
    return "\n".join([f"{source}: invalid campaign settings", *(f"  {line}" for line in lines)])


def _problem(item: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in item["loc"])
    if item["type"] == "extra_forbidden":
        return f"unknown key '{key}': check its spelling (docs/settings.md lists every setting)"
    hint = _HINTS.get(item["type"], "")
    return f"'{key}': {item['msg']}{hint} (got {item.get('input')!r})"


def campaign_from_dict(data: dict[str, Any], source: str = "<settings>") -> Campaign:
    """Validate a nested dict of settings into a :class:`Campaign`.

    Raises
    ------
    CampaignError
        On an unknown key or a value of the wrong type, naming the key.
    """
    try:
        return Campaign.model_validate(data)
    except ValidationError as error:
        raise CampaignError(_describe(error, source)) from None


def _resolve_relative_files(data: dict[str, Any], folder: Path) -> None:
    """Make file settings relative to the campaign file's folder, where they exist,
    including the ``file.py:name`` paths of plug-ins."""
    for section, key in (
        ("system", "structure"),
        ("test", "file"),
        ("model", "foundation"),
        ("training", "replay_file"),
        ("initial", "file"),
        ("initial", "ensemble"),
    ):
        value = data.get(section, {}).get(key)
        if isinstance(value, str) and value and (folder / value).exists():
            data[section][key] = str(folder / value)

    for system in data.get("systems", []) if isinstance(data.get("systems"), list) else []:
        for key in ("structure", "test_file"):
            value = system.get(key) if isinstance(system, dict) else None
            if isinstance(value, str) and value and (folder / value).exists():
                system[key] = str(folder / value)

    def resolve(value: Any) -> Any:
        file_name, sep, name = value.rpartition(":") if isinstance(value, str) else ("", "", "")
        if sep and file_name.endswith(".py") and (folder / file_name).is_file():
            return f"{folder / file_name}:{name}"
        return value

    for section, key in (("selection", "measure"), ("selection", "query")):
        if key in data.get(section, {}):
            data[section][key] = resolve(data[section][key])
    metrology = data.get("metrology", {})
    if isinstance(metrology.get("plugins"), list):
        metrology["plugins"] = [resolve(v) for v in metrology["plugins"]]


def load_campaign(path: str | Path | None = None, **overrides: Any) -> Campaign:
    """Load the embedded default, a TOML file over it, then dotted overrides.

    Parameters
    ----------
    path
        A TOML campaign file, or None for the embedded default.
    overrides
        Values keyed by section and key joined with ``__``, e.g.
        ``stop__max_labels=50``.
    """
    data: dict[str, Any] = {}
    source = "<default campaign>"
    if path is not None:
        source = str(path)
        data = read_campaign_file(path)
        _resolve_relative_files(data, Path(path).resolve().parent)
    for dotted, value in overrides.items():
        *sections, key = dotted.split("__")
        target = data
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = value
    return campaign_from_dict(data, source)
