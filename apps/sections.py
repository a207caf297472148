"""The campaign sections that tasks read, defined once: ``[training]`` and ``[generator]``.

The pipeline validates a campaign with these classes
(:mod:`palflow.pipeline.config.settings`), and a task validates the section it is
given with the same class, so that a key, its type, its bounds and its default are
written in one place and a task never holds defaults of its own. Every section
forbids unknown keys.
"""

from __future__ import annotations

import itertools
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
    learning_rate_plateau_patience: int = Field(3, ge=1)
    """The rate is cut after this many judged tasks in a row whose new state did not
    beat the published one on validation (:class:`palflow.apps.publication.RateOnPlateau`);
    new labels neither raise nor reset it."""
    learning_rate_plateau_factor: float = Field(0.5, gt=0, le=1)
    """Each cut multiplies the rate by this (1: never cut); the floor stays
    ``learning_rate_min``."""
    learning_rate_plateau_threshold: float = Field(0.01, ge=0, lt=1)
    """A gain is a validation score at least this fraction below the published state's."""
    batch_size: int = Field(16, ge=1)
    """Labelled structures per optimiser step."""
    loss: Literal["mse", "huber"] = "huber"
    """The penalty of each error: its square, or the Huber penalty (the square up to
    ``huber_delta``, linear beyond), which keeps a few wild labels from dominating."""
    huber_delta: float = Field(0.01, gt=0)
    """Where the Huber penalty turns linear, in the error's unit (eV/atom, eV/Å)."""
    energy_weight: float = Field(10.0, ge=0)
    """Weight of the energy term, on the penalty (``loss``) of the energy error per atom
    (eV/atom)."""
    force_weight: float = Field(10.0, ge=0)
    """Weight of the force term, on the penalty (``loss``) of each force component's
    error (eV/Å)."""
    stress_weight: float = Field(1.0, ge=0)
    """Weight of the stress term, on the virial per atom (eV/atom) so that it weighs
    like the energy term; it applies to the labels with a stress (periodic cells whose
    oracle gives one), and 0 ignores stress."""
    bootstrap: bool = True
    """Each member trains on its own bootstrap resample of the labels."""
    rolling_window: int = Field(0, ge=0)
    """Train on the newest N labels only (0 keeps all); for cheap oracles."""
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of the labels held out of training for good (by a hash of their content). A
    member's validation frames are these and, with ``bootstrap``, the labels its own
    resample left out."""
    average_decay: float = Field(0.99, ge=0, lt=1)
    """Largest decay per step of the weight average that members publish (0: publish
    the raw weights). It warms up with the step count and never reaches back more than
    half a task (:class:`palflow.apps.publication.WeightAverage`)."""
    gate_tolerance: float = Field(0.05, ge=0)
    """A member's new state is published only if the mean of its energy-MAE and
    force-MAE ratios to the published state's is at most ``1 + gate_tolerance``, both
    measured on the member's current validation frames; otherwise the member trains
    on and its last good state stays published. Set it very large to publish every
    state."""
    min_validation_size: int = Field(8, ge=1)
    """With fewer validation frames than this the gate does not judge (every state is
    published, and the metrics say the gate did not judge)."""
    train_only: Literal["all", "readout", "last_interaction"] = "all"
    """Which weights training moves: all of them; only the readout (``"readout"``); or
    the last message-passing layer and the readout (``"last_interaction"``); the rest
    stay as the member started, e.g. the foundation's (``model.foundation``), so that
    few labels move fewer weights. Forces still train (they are derivatives with
    respect to the positions). Each backend's model names its parts; with one that
    does not, the first training task fails, naming the backend."""
    replay_fraction: float = Field(0.0, ge=0, lt=1)
    """Share of each batch of ``batch_size`` frames that is replay frames (at least one
    when above 0; 0: no replay): labelled frames of the domain a fine-tuned member
    should not forget, trained on their forces and stress only, never their energy
    (another level of theory has another energy reference). They are never validation
    frames."""
    replay_source: Literal["file", "foundation"] = "file"
    """Where replay frames come from: ``"file"``, ``replay_file``; ``"foundation"``,
    pseudo-labels: each member's own forces (and stress) as it starts, from the
    foundation model (or a warm start), on ``replay_size`` rattled copies of its first
    training frames, made once at its first task and kept in its checkpoint."""
    replay_file: str | None = None
    """With ``replay_source = "file"``: labelled frames (extended XYZ, or any file ASE
    reads) with forces in eV/Å, e.g. a few hundred frames of the foundation's own
    training data; energies are not needed. A relative path is from the current
    folder."""
    replay_size: int = Field(64, ge=1)
    """With ``replay_source = "foundation"``: pseudo-labelled frames per member."""
    replay_rattle: float = Field(0.05, gt=0)
    """Standard deviation of the displacements that make the pseudo-labelled copies of
    the training frames, Å (``replay_source = "foundation"``)."""

    @field_validator("replay_file")
    @classmethod
    def _readable_replay_file(cls, path: str | None) -> str | None:
        return None if path is None else _check_replay_file(path)

    @model_validator(mode="after")
    def _replay_settings_agree(self) -> TrainingSettings:
        fraction, source = self.replay_fraction, self.replay_source
        if fraction > 0 and source == "file" and self.replay_file is None:
            raise ValueError(
                f"replay_fraction = {fraction:g} takes replay frames from replay_file, and "
                "none is given: give a file of labelled frames, or replay_source = 'foundation'"
            )
        if self.replay_file is not None and source != "file":
            raise ValueError(
                "replay_file is read only with replay_source = 'file', not 'foundation': "
                "drop one of them"
            )
        if fraction == 0 and (self.replay_file is not None or source != "file"):
            raise ValueError(
                "replay_fraction = 0 puts no replay frame in a batch, so replay_file or "
                "replay_source = 'foundation' does nothing: set replay_fraction (e.g. 0.25)"
            )
        if fraction > 0 and self.batch_size < 2:
            raise ValueError(
                f"replay_fraction = {fraction:g} needs batch_size >= 2: a batch holds at "
                "least one of the campaign's labels and one replay frame"
            )
        return self


def _check_replay_file(path: str) -> str:
    """``path`` made absolute (a worker's folder is not the user's), once its first
    frame reads and has forces; the training task reads every frame and checks each
    (:func:`palflow.apps.fine_tuning.read_replay_file`)."""
    from ase.io import read  # slow to import (SciPy): only where a replay file is given

    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise ValueError(f"no file {full}: give a file of labelled frames with forces")
    try:
        first = read(full, index=0)
    except Exception as error:
        raise ValueError(f"{full} does not parse as a structure file: {error}") from None
    if "forces" not in (getattr(first.calc, "results", None) or {}):
        raise ValueError(
            f"{full} holds no forces (its first frame has none): replay trains on forces, "
            "in eV/Å, so give a file with a forces column"
        )
    return full


BUILT_IN_GENERATORS = ("md", "biased_md", "metadynamics", "replica_exchange", "rattle")
"""``generator.kind``'s built-in names."""

CV_ATOMS = {"distance": 2, "angle": 3, "dihedral": 4}
"""How many atoms each geometric collective variable takes."""


class CollectiveVariable(Section):
    """One collective variable of ``generator.collective_variables``."""

    kind: Literal["distance", "angle", "dihedral", "coordination"]
    """``"distance"`` (Å), ``"angle"`` and ``"dihedral"`` (radians; a dihedral is
    periodic), or ``"coordination"``: the smooth count ``Σ (1 - (r/r0)^6) / (1 -
    (r/r0)^12)`` over the pairs of ``atoms`` with ``to_atoms``."""
    atoms: list[int] = Field(min_length=1)
    """0-based atom indices: 2, 3 or 4 of them, or a coordination's first group."""
    to_atoms: list[int] = []
    """A coordination's second group."""
    width: float = Field(gt=0)
    """The hills' width along this variable (its own unit)."""
    r0: float = Field(2.0, gt=0)
    """A coordination's switching distance, Å."""
    name: str = ""
    """A label for the report (default: the kind and the atoms)."""

    @model_validator(mode="after")
    def _atoms_fit_the_kind(self) -> CollectiveVariable:
        wanted = CV_ATOMS.get(self.kind)
        if wanted is not None and len(self.atoms) != wanted:
            raise ValueError(f"a {self.kind} takes {wanted} atoms, not {len(self.atoms)}")
        if self.kind == "coordination" and not self.to_atoms:
            raise ValueError("a coordination needs to_atoms, the second group")
        if min(self.atoms + self.to_atoms) < 0:
            raise ValueError("atom indices count from 0")
        return self

    @property
    def label(self) -> str:
        return self.name or f"{self.kind} {'-'.join(map(str, self.atoms))}"


class GeneratorSettings(Section):
    kind: str = "md"
    """What proposes candidates: ``"md"`` (molecular dynamics on the ensemble: NVT with
    the Langevin integrator, NVE with Verlet, NPT with ``pressure_bar``), the MD that
    explores further (``"biased_md"``: pushed towards the committee's disagreement;
    ``"metadynamics"``: well-tempered, on ``collective_variables``;
    ``"replica_exchange"``: parallel tempering on ``temperature_ladder_K``), ``"rattle"``
    (random displacements and cell strains around the start and the labelled
    structures), or a user's generator, ``"module:function"`` or
    ``"path/to/file.py:function"``, with the signature of
    :class:`palflow.pipeline.policies.protocols.Generator`. A bias only decides where
    walkers go: their frames are scored by the unbiased committee and labelled by the
    unbiased oracle."""
    n_walkers: int = Field(4, ge=1)
    """Walkers of each system (a system's own ``n_walkers`` overrides it)."""
    walkers_per_task: int = Field(0, ge=0)
    """Walkers one generator task advances together, in one batched ensemble pass per
    step; 0 spreads the walkers evenly over the site's generator slots."""
    integrator: Literal["langevin", "verlet"] = "langevin"
    """``"langevin"`` (NVT, or NPT with ``pressure_bar``) or ``"verlet"`` (NVE, or NPH
    with ``pressure_bar``)."""
    steps_per_task: int = Field(100, ge=1)
    """MD steps one generator task advances each walker by."""
    timestep_fs: float = Field(0.5, gt=0)
    """MD time step of the walkers (and of the held-out set's oracle-driven MD), fs."""
    temperature_K: float = Field(500.0, gt=0)
    """Temperature (K) of the walkers (a system's own ``temperatures_K`` overrides it);
    the default of ``test.temperature_K`` and ``validate.temperature_K``."""
    friction: float = Field(0.02, gt=0)
    """Langevin friction, 1/fs."""
    sample_interval: int = Field(5, ge=1)
    """MD steps between recorded candidate frames."""
    max_force_disagreement: float = Field(3.0, gt=0)
    """Hard cap (eV/Å): above it the walker has blown up and is reset."""
    min_distance: float = Field(0.6, gt=0)
    """Atoms closer than this (Å) mean the walker has blown up."""
    min_distance_factor: float = Field(0.6, ge=0)
    """So do two atoms closer than this times the sum of their covalent radii (0.6:
    1.58 Å for copper, 0.37 Å for hydrogen): such frames get absurd forces from the
    oracle, which refuses them, and a committee far from its data rates them the most
    uncertain of all (0 turns the check off)."""
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
    temperature_schedule: list[list[float]] = []
    """A ramp of each walker's temperature over its own MD steps: ``[[step, factor],
    ...]`` with steps rising from 0, the factor multiplying the walker's temperature,
    linear in between and held after the last point (``[[0, 1], [2000, 2]]`` heats
    each walker to twice its temperature over 2,000 steps). The phase is the walker's
    own: it restarts when the walker is reset. Empty: a constant temperature."""
    schedule_repeats: bool = False
    """Repeat ``temperature_schedule`` from its start after its last point (annealing
    cycles) instead of holding it."""
    # ---- biased_md
    bias_shape: Literal["udd", "hal"] = "hal"
    """``kind = "biased_md"``: the bias energy from the committee's energy variance
    σ² over N atoms. ``"udd"`` (uncertainty-driven dynamics): ``A (exp(-σ²/(N B²)) -
    1)``, a well of depth ``A`` and width ``B``; ``"hal"`` (hyperactive learning):
    ``-τ σ``. Its forces need only the members' energies and forces."""
    bias_strength: float = Field(100.0, ge=0)
    """The bias's strength, ``A`` in eV for ``"udd"``, ``τ`` (no unit) for ``"hal"``:
    fixed when ``bias_force_fraction`` is 0, otherwise the most the adaptive strength
    may reach (100: no ceiling in practice; give a UDD well its depth, e.g. 0.5)."""
    bias_width_eV: float = Field(0.02, gt=0)
    """``B`` of the ``"udd"`` shape, eV: the energy spread per √atom over which the
    bias saturates."""
    bias_force_fraction: float = Field(0.5, ge=0, le=2)
    """The adaptive strength: the bias's mean force per atom is kept at this fraction
    of the physical one (running means over about 20 steps, per walker). 0: the fixed
    ``bias_strength``. The defaults (``"hal"``, 0.5, no ceiling, 2 eV/Å) are a bias that
    acts (the ``"udd"`` well of the earlier defaults was flat in most frames); a gain in
    accuracy over plain MD is not shown (``docs/performance.md``)."""
    max_bias_force: float = Field(2.0, gt=0)
    """The largest bias force on one atom, eV/Å: a guard against runaway."""
    bias_trust_level: float = Field(2.0, ge=0)
    """The upper trust level of a biased walker, eV/Å of force disagreement: past it
    the walker stops, its frames so far are kept, and it is reset to its start
    (0: no such level; ``max_force_disagreement`` still applies)."""
    # ---- metadynamics
    collective_variables: list[CollectiveVariable] = []
    """``kind = "metadynamics"``: the collective variables, e.g. ``[{kind =
    "dihedral", atoms = [4, 6, 8, 14], width = 0.35}]``; atoms are 0-based indices of
    each system's structure, and distances follow periodic boundaries."""
    hill_height_eV: float = Field(0.05, gt=0)
    """The height of a hill before well-tempering, eV."""
    hill_interval: int = Field(25, ge=1)
    """MD steps between hills, counted in each walker's own steps (so across tasks)."""
    bias_factor: float = Field(10.0, gt=1)
    """Well-tempered metadynamics' bias factor γ = (T + ΔT) / T, above 1: a hill is
    ``hill_height_eV · exp(-V / (k ΔT))`` high where the bias is already ``V``."""
    shared_hills: bool = False
    """The walkers of a system build one bias together (multiple walkers): a walker
    sees the hills of the others of its task at once and the others' at its next
    task. False: each walker its own bias."""
    # ---- replica_exchange
    temperature_ladder_K: list[float] = []
    """``kind = "replica_exchange"``: the ladder, in K, rising; a system's walkers run
    in ladders of this length (its walker count a multiple of it), each ladder in one
    task, the walker ``i`` of a ladder at its ``i``-th temperature."""
    exchange_interval: int = Field(20, ge=1)
    """MD steps between exchange attempts (neighbours on the ladder, even and odd
    pairs in turn), at most ``steps_per_task``; walkers that have blown up are left
    out."""

    @field_validator("kind")
    @classmethod
    def _known_generator(cls, kind: str) -> str:
        if kind in BUILT_IN_GENERATORS or ":" in kind:
            return kind
        raise ValueError(
            f"unknown generator {kind!r}: built in are {', '.join(map(repr, BUILT_IN_GENERATORS))}"
            ", or give 'module:function' or 'path/to/file.py:function'"
        )

    @field_validator("temperature_schedule")
    @classmethod
    def _rising_schedule(cls, points: list[list[float]]) -> list[list[float]]:
        if any(len(p) != 2 for p in points):
            raise ValueError("give [step, factor] pairs, e.g. [[0, 1.0], [2000, 2.0]]")
        steps = [p[0] for p in points]
        if points and (steps[0] != 0 or any(b <= a for a, b in itertools.pairwise(steps))):
            raise ValueError(f"its steps {steps} must start at 0 and rise")
        if any(p[1] <= 0 for p in points):
            raise ValueError("its factors must be above 0")
        return points

    @field_validator("temperature_ladder_K")
    @classmethod
    def _sorted_ladder(cls, ladder: list[float]) -> list[float]:
        if any(t <= 0 for t in ladder) or any(b <= a for a, b in itertools.pairwise(ladder)):
            raise ValueError(f"{ladder} must rise strictly, every temperature above 0 K")
        return ladder

    @model_validator(mode="after")
    def _what_the_kind_needs(self) -> GeneratorSettings:
        if self.kind == "metadynamics" and not self.collective_variables:
            raise ValueError(
                'generator.kind = "metadynamics" needs generator.collective_variables, '
                'e.g. [{kind = "dihedral", atoms = [4, 6, 8, 14], width = 0.35}]'
            )
        if self.kind == "replica_exchange" and len(self.temperature_ladder_K) < 2:
            raise ValueError(
                'generator.kind = "replica_exchange" needs generator.temperature_ladder_K: '
                f"at least two temperatures, rising (given {self.temperature_ladder_K})"
            )
        thermostatted = "a ladder" if self.kind == "replica_exchange" else None
        thermostatted = thermostatted or ("a schedule" if self.temperature_schedule else None)
        if thermostatted and self.integrator == "verlet":
            raise ValueError(
                f'{thermostatted} of temperatures needs a thermostat: integrator = "verlet" '
                'keeps none; use "langevin"'
            )
        if self.kind == "replica_exchange" and self.temperature_schedule:
            raise ValueError(
                "replica exchange keeps each rung at its ladder temperature: drop "
                "generator.temperature_schedule (or widen the ladder)"
            )
        if self.kind == "replica_exchange" and self.exchange_interval > self.steps_per_task:
            raise ValueError(
                f"generator.exchange_interval = {self.exchange_interval} is longer than a task "
                f"(steps_per_task = {self.steps_per_task}): no exchange would be tried"
            )
        return self
