"""Campaign settings of the members: what each one is (``[model]``) and how it
trains (``[training]``), and the base every section shares.

:mod:`palflow.pipeline.config.settings` re-exports all of it; see there for the campaign as a whole.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator


class _Section(BaseModel):
    """A campaign section: unknown keys are errors, and no float may be infinite or
    NaN (give a large number for "no limit"; a setting whose 0 means "none" says so)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


SCHNET_KEYS = ("cutoff", "n_features", "n_interactions", "n_rbf")
MACE_KEYS = (
    "r_max",
    "num_channels",
    "max_L",
    "correlation",
    "num_interactions",
    "num_radial_basis",
    "num_cutoff_basis",
    "dtype",
    "e0s",
    "foundation",
)


class ModelSettings(_Section):
    name: Literal["schnet", "mace"] = "schnet"
    """``schnet`` (palflow's compact SchNet) or ``mace`` (mace-torch)."""
    n_members: int = Field(4, ge=2)
    # SchNet
    cutoff: float = Field(5.0, gt=0)
    """Neighbour cutoff, Å (SchNet)."""
    n_features: int = Field(32, ge=4)
    n_interactions: int = Field(2, ge=1)
    n_rbf: int = Field(16, ge=2)
    # MACE
    r_max: float = Field(5.0, gt=0)
    """Cutoff radius, Å (MACE)."""
    num_channels: int = Field(16, ge=1)
    """Channels of MACE's hidden features."""
    max_L: int = Field(1, ge=0, le=3)
    """Largest L of the equivariant hidden features (0: invariant only)."""
    correlation: int = Field(3, ge=1, le=4)
    """Body order of the product basis."""
    num_interactions: int = Field(2, ge=1)
    """Message-passing layers (MACE)."""
    num_radial_basis: int = Field(8, ge=1)
    num_cutoff_basis: int = Field(5, ge=1)
    dtype: Literal["float32", "float64"] = "float64"
    """Precision of MACE's training and MD (MACE advises float64 for MD)."""
    e0s: Literal["average", "oracle"] | dict[str, float] = "average"
    """Isolated-atom energies: ``average`` (least squares on the first labels),
    ``oracle`` (one oracle call per element on an isolated atom, in the coordinator's
    process), or a table ``{"H": -13.6, ...}`` in eV."""
    foundation: str | None = None
    """A MACE model file every member starts from (fine-tuning), e.g. MACE-MP-0 or
    MACE-OFF, downloaded beforehand; its element table, E0s and cutoff are kept."""

    @model_serializer(mode="wrap")
    def _only_this_models_keys(self, handler) -> dict[str, Any]:
        """Dump (``campaign.json``) the keys of the chosen model only, so that the
        dump validates again on ``--resume``."""
        other = SCHNET_KEYS if self.name == "mace" else MACE_KEYS
        return {k: v for k, v in handler(self).items() if k not in other}

    @model_validator(mode="after")
    def _keys_of_the_model(self) -> ModelSettings:
        other = SCHNET_KEYS if self.name == "mace" else MACE_KEYS
        wrong = sorted(set(other) & self.model_fields_set)
        if wrong:
            raise ValueError(
                f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not a setting of "
                f"model.name = {self.name!r}: drop it or change the model's name"
            )
        return self


class TrainingSettings(_Section):
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
