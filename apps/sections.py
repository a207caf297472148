"""The campaign sections that tasks read, defined once: ``[training]`` and ``[generator]``.

The pipeline validates a campaign with these classes
(:mod:`palflow.pipeline.config.settings`), and a task validates the section it is
given with the same class, so that a key, its type, its bounds and its default are
written in one place and a task never holds defaults of its own. Every section
forbids unknown keys.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Section(BaseModel):
    """A campaign section: unknown keys are errors, and no float may be infinite or
    NaN (give a large number for "no limit"; a setting whose 0 means "none" says so)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class TrainingSettings(Section):
    epochs_per_task: int = Field(8, ge=1)
    """Epochs one training task runs for one member before new data is taken in."""
    min_task_s: float = Field(2.0, ge=0)
    """A task also runs until this many seconds have passed (s), so that tasks on a
    small dataset are not all overhead and ensemble versions come at a steady pace."""
    learning_rate: float = Field(3e-3, gt=0, le=1)
    """Initial Adam learning rate."""
    learning_rate_min: float = Field(3e-4, gt=0, le=1)
    """The rate decays towards this floor (at most ``learning_rate``)..."""
    learning_rate_half_life_steps: int = Field(1500, ge=0)
    """...halving its distance to it every this many optimiser steps (0: constant)."""
    batch_size: int = Field(16, ge=1)
    force_weight: float = Field(10.0, ge=0)
    stress_weight: float = Field(1.0, ge=0)
    """Weight of the stress term, on the virial per atom (eV/atom) so that it weighs
    like the energy term; it applies to the labels with a stress (periodic cells whose
    oracle gives one), and 0 ignores stress."""
    bootstrap: bool = True
    """Each member trains on its own bootstrap resample of the labels."""
    rolling_window: int = Field(0, ge=0)
    """Train on the newest N labels only (0 keeps all); for cheap oracles."""
    validation_fraction: float = Field(0.1, ge=0, lt=1)


class GeneratorSettings(Section):
    kind: str = "md"
    """What proposes candidates: ``"md"`` (molecular dynamics on the ensemble: NVT with
    the Langevin integrator, NVE with Verlet, NPT with ``pressure_bar``), ``"rattle"``
    (random displacements and cell strains around the start and the labelled
    structures), or a user's generator, ``"module:function"`` or
    ``"path/to/file.py:function"``, with the signature of
    :class:`palflow.pipeline.policies.protocols.Generator`."""
    n_walkers: int = Field(4, ge=1)
    walkers_per_task: int = Field(0, ge=0)
    """Walkers one generator task advances together, in one batched ensemble pass per
    step; 0 spreads the walkers evenly over the site's generator slots."""
    integrator: Literal["langevin", "verlet"] = "langevin"
    steps_per_task: int = Field(100, ge=1)
    timestep_fs: float = Field(0.5, gt=0)
    temperature_K: float = Field(500.0, gt=0)
    friction: float = Field(0.02, gt=0)
    """Langevin friction, 1/fs."""
    sample_interval: int = Field(5, ge=1)
    """MD steps between recorded candidate frames."""
    max_force_disagreement: float = Field(3.0, gt=0)
    """Hard cap (eV/Å): above it the walker has blown up and is reset."""
    min_distance: float = Field(0.6, gt=0)
    """Atoms closer than this (Å) mean the walker has blown up."""
    max_neighbour_distance: float = Field(4.0, gt=0)
    """A non-periodic atom farther than this (Å) from every other atom has flown off."""
    pressure_bar: float | None = None
    """Constant pressure (bar) for MD: isotropic stochastic cell rescaling (NPT with the
    Langevin integrator); needs a cell periodic in all directions. None: constant
    volume."""
    barostat_time_fs: float = Field(500.0, gt=0)
    """The barostat's relaxation time, fs."""
    compressibility_per_bar: float = Field(4.5e-5, gt=0)
    """The isothermal compressibility the barostat assumes, 1/bar (water's by default;
    it sets how fast the volume relaxes, not the volume it relaxes to)."""
    rattle_stdev: float = Field(0.05, gt=0)
    """``kind = "rattle"``: standard deviation of the atomic displacements, Å."""
    rattle_strain: float = Field(0.02, ge=0)
    """``kind = "rattle"``: largest cell strain component (periodic cells only)."""

    @field_validator("kind")
    @classmethod
    def _known_generator(cls, kind: str) -> str:
        if kind in ("md", "rattle") or ":" in kind:
            return kind
        raise ValueError(
            f"unknown generator {kind!r}: built in are 'md' and 'rattle', or give "
            "'module:function' or 'path/to/file.py:function'"
        )
