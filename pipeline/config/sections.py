"""The sections of a campaign's settings, one class per TOML table.

:class:`palflow.pipeline.config.settings.Campaign` holds one of each; the members'
sections (``[model]``, ``[training]``) are in
:mod:`palflow.pipeline.config.model_settings`. Every section forbids unknown keys.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, field_validator

from palflow.apps.sections import GeneratorSettings  # noqa: F401 (re-exported)
from palflow.apps.sections import Section as _Section

logger = logging.getLogger(__name__)


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
"""A name that is a safe file name: no path, no spaces, no leading dot."""


class SystemSettings(_Section):
    """One system the potential must cover: ``[system]``, or each of ``[[systems]]``.

    The optional settings override the campaign's for this system's walkers and
    candidates; unset, the campaign's ``[generator]`` and ``[selection]`` apply.
    """

    name: str = Field("main", pattern=NAME_PATTERN)
    """A name for the system's numbers in metrics and labels (letters, digits, ``_.-``)."""
    structure: str = Field("CH3CH2OH", min_length=1)
    """An ASE molecule name (``ase.build.molecule``) or a structure file readable by ASE;
    a file of several frames gives several start configurations, which the walkers
    share out."""
    vacuum: float = Field(0.0, ge=0)
    """Vacuum (Å) added around a non-periodic structure; 0 leaves the cell as read."""
    n_walkers: int | None = Field(None, ge=1)
    """This system's walkers; default ``generator.n_walkers``."""
    temperatures_K: list[float] | None = None
    """Temperatures (K) that this system's walkers share out, e.g. ``[300, 1200]``;
    default ``[generator.temperature_K]``."""
    pressure_bar: float | None = None
    """Constant pressure (bar) for this system's MD; default ``generator.pressure_bar``."""
    generator: str | None = None
    """This system's generator (as ``generator.kind``); default ``generator.kind``."""
    threshold: float | None = Field(None, gt=0)
    """This system's selection threshold (a fixed one); default the campaign's."""
    max_labels: int | None = Field(None, ge=1)
    """A cap on this system's active labels, within ``stop.max_labels``."""
    test_file: str | None = None
    """A labelled structure file for this system's held-out frames, instead of
    oracle-driven MD from its start (``test.file`` replaces every system's)."""

    @field_validator("temperatures_K")
    @classmethod
    def _positive_temperatures(cls, values: list[float] | None) -> list[float] | None:
        if values is not None and (not values or min(values) <= 0):
            raise ValueError("give one or more temperatures above 0 K")
        return values

    @field_validator("generator")
    @classmethod
    def _known_generator(cls, kind: str | None) -> str | None:
        return None if kind is None else GeneratorSettings._known_generator(kind)


class OracleSettings(_Section):
    calculator: str = "xtb.ase.calculator:XTB"
    """Import path ``module:Class`` of any ASE calculator."""
    kwargs: dict[str, Any] = Field(default_factory=lambda: {"method": "GFN2-xTB"})
    """Keyword arguments for the calculator."""
    batch_size: int = Field(4, ge=1)
    """Structures labelled per oracle task."""
    max_force: float = Field(50.0, gt=0)
    """Forces above this (eV/Å) are recorded as a failed label, never trained on."""
    timeout_s: float = Field(1800.0, ge=0)
    """Longest one structure's calculation may take (s) before it is killed and
    counted as a transient failure; 0 waits for ever."""
    trial: bool = True
    """Label the start structures once, within ``timeout_s``, before anything is created
    (skipped for MPI oracles); false skips it, e.g. for a DFT oracle."""
    isolate: bool = True
    """Calculate in a child process, so that a hang or a crash costs one structure."""
    max_attempts: int = Field(3, ge=1)
    """Attempts per structure at a transient failure (error, timeout, crash, lost
    task). Deterministic ones (NaN, absurd forces, SCF not converged) get one."""
    mpi_ranks: int = Field(1, ge=1)
    """MPI ranks of one oracle task. A calculator uses them through the placeholder
    ``{mpi_prefix}`` in its kwargs, e.g. ``command = "{mpi_prefix} nwchem PREFIX.nwi"``."""
    mpi_nodes: int = Field(1, ge=1)
    """Nodes one oracle task spans (on a site whose oracle is an MPIExecutor)."""


class SelectionSettings(_Section):
    measure: str = Field("max_force_spread", min_length=1)
    """What scores frames, higher meaning more worth labelling: a name registered in
    :mod:`palflow.pipeline.policies.measures` (``max_force_spread``, ``mean_force_spread``,
    ``energy_spread``, ``relative_force_spread``, ``ucb``, ``thompson``, ``random``,
    ``labelled_distance``) or a ``module:function`` / ``file.py:function`` path."""
    measure_options: dict[str, Any] = Field(default_factory=dict)
    """Options the measure reads, e.g. ``{kappa = 2.0}`` for ``ucb``; a key the measure
    does not declare is an error (see
    :func:`palflow.pipeline.policies.measures.measure_options`)."""
    threshold: float = Field(0.05, ge=0)
    """Score above which a frame is worth labelling (the lower trust level), in the
    measure's units: eV/Å for the force measures. ``random`` ignores it."""
    threshold_mode: Literal["fixed", "percentile", "calibrated"] = "fixed"
    """``fixed``: ``threshold``. ``percentile``: the ``threshold_percentile``-th
    percentile of the last ``threshold_window`` frame scores. ``calibrated``: the
    score at which the force error is expected to reach ``calibration_target``, fitted
    on the validation labels (``training.validation_fraction``, never the held-out
    set) at the newest evaluation (force measures only)."""
    threshold_percentile: float = Field(90.0, ge=0, le=100)
    """With ``threshold_mode = "percentile"``: the percentile of the recent frame scores
    that is the threshold."""
    threshold_window: int = Field(500, ge=1)
    """With ``threshold_mode = "percentile"``: how many of the most recent frame scores
    the percentile is taken over."""
    calibration_target: float = Field(0.05, gt=0)
    """Force error (eV/Å) a frame should be expected to have to be worth a label."""
    upper_threshold: float = Field(0.0, ge=0)
    """Upper trust level (0: none): a frame scoring above it is out of the model's
    domain. It is not labelled, and its walker resets (DP-GEN's trust levels)."""
    query: str = Field("top", min_length=1)
    """How an oracle batch is drawn from the queue: ``top`` (highest scores),
    ``coreset`` (farthest from the labelled set and each other, in descriptor space),
    ``cluster`` (the best of each cluster of the queue), or a ``module:Class`` /
    ``file.py:Class`` implementing :class:`palflow.pipeline.policies.protocols.Query`."""
    random_fraction: float = Field(0.0, ge=0, le=1)
    """Share of each oracle batch drawn at random from the queue instead (a hybrid:
    0.4 takes 60% by the query and 40% at random, against a biased training set)."""
    max_per_trajectory: int = Field(3, ge=1)
    """Cap on frames taken from one walker's segment."""
    min_frame_gap: int = Field(4, ge=0)
    """Diversity: picked frames of one trajectory are at least this many frames apart."""
    max_labels_per_version: int = Field(8, ge=0)
    """Pacing (0: none): at most this many active labels per ensemble version
    published, requested while that version is the newest (an unused allowance is not
    banked), so that labels come no faster than the ensemble learns from them and
    every batch is chosen by a recent ensemble. It binds with oracles cheaper than
    training (xTB: see benchmarks/time_to_accuracy.py); a DFT oracle paces itself.
    Generators pause while the queue holds twice this many candidates."""
    rescore: bool = True
    """Re-score the oracle queue with each new ensemble (PAL's dynamic oracle list)."""
    max_queue: int = Field(256, ge=1)
    """The oracle queue keeps at most this many candidates, the highest scored;
    generators pause while it is full."""


class MetrologySettings(_Section):
    plugins: list[str] = Field(default_factory=list)
    """Extra metrics per ensemble version: ``module:Class`` or ``file.py:Class`` paths
    of :class:`palflow.pipeline.policies.protocols.Metrology` implementations."""


class InitialSettings(_Section):
    n_structures: int = Field(16, ge=2)
    """Rattled copies of the start structure labelled before the first training."""
    rattle: float = Field(0.05, ge=0)
    """Standard deviation of the rattle, Å."""
    file: str | None = None
    """A warm start: labelled structures (extxyz, an ASE database, any file ASE reads,
    with energies and forces; stress optional) taken as the first training data with
    no oracle call. The rattled copies are then skipped. A finished run's
    ``labels.extxyz`` or ``labels.db`` serves."""
    ensemble: str | None = None
    """A warm start of the members: an earlier run's ensemble file
    (``models/ensemble.vNNNNN.pt``) or run directory (its newest ensemble). Member k
    continues from its member k (modulo its size), with a fresh optimiser."""


class TestSetSettings(_Section):
    __test__ = False  # not a pytest class despite the name

    n_structures: int = Field(32, ge=0)
    """Held-out frames, labelled by the oracle, for the test force MAE. 0 (without
    ``file``) labels no held-out set: the campaign then reports its validation error
    and the exploration ratios, and says that no independent test error exists."""
    md_stride: int = Field(10, ge=1)
    """Oracle-driven MD steps between held-out frames."""
    temperature_K: float | None = Field(None, gt=0)
    """Temperature of the held-out MD; defaults to the generator's."""
    file: str = ""
    """A labelled structure file to use instead of oracle-driven MD."""


class StopSettings(_Section):
    max_labels: int = Field(300, ge=0)
    """Active-learning labels (initial ones not counted). 0, with ``initial.file``,
    trains on that file's labels alone: the campaign stops at once and trains for
    ``final_training_s``."""
    max_wall_s: float = Field(540.0, gt=0)
    """Wall-time limit of the campaign (s); a resumed run counts the time earlier
    sessions spent. The final training (``stop.final_training_s``) fits within it."""
    target_force_mae: float = Field(0.0, ge=0)
    """Stop when the test force MAE (eV/Å) reaches this; 0 disables. It needs a
    held-out set."""
    accurate_ratio: float = Field(0.0, ge=0, le=1)
    """Stop once the ensemble agrees on what it explores: for every system, at least
    this share of the frames of its ``accurate_window`` most recent generator segments
    scored below the lower trust level (the selection threshold), at
    ``accurate_versions`` ensemble versions in a row (DP-GEN's accurate ratio). Needs
    no held-out set; 0 disables. Its meaning rests on the lower trust level: with a
    calibrated threshold at your target force error, 0.5 means that the median explored
    frame is expected below the target (see docs/concepts.md, "Is it done")."""
    accurate_window: int = Field(8, ge=1)
    """Generator segments per system, the most recent, that the ratios are taken over."""
    accurate_versions: int = Field(3, ge=1)
    """Ensemble versions in a row, each with new segments in the window, at which the
    accurate ratio must hold before the campaign stops."""
    final_training_s: float = Field(60.0, ge=0)
    """Final training, in seconds of wall time: after a stop (other than the wall-time
    limit), the members go on training on the final labels this long, within
    ``max_wall_s``, before the last ensemble version is published and evaluated.
    0 trains only as long as each member takes to take in the last labels in one more
    training task (as every stop does), so that the last version holds every label:
    the shortest end, e.g. for a smoke run, of which the 60 s default can be most.
    ``summary.json`` says what it did (``final_training``)."""


class ValidateSettings(_Section):
    """``[validate]``: the MD check of the exported potential (``palflow validate``),
    and whether a campaign runs it as its final stage."""

    after_campaign: bool = False
    """Run the check once the campaign stops, on the site's generator executor; its
    verdict goes to ``validate.json``, the report and the exit status."""
    ensembles: list[Literal["nve", "nvt"]] = Field(
        default_factory=lambda: ["nve", "nvt"], min_length=1
    )
    """Which runs each system gets: ``nve`` (velocity Verlet, for the energy drift)
    and ``nvt`` (Langevin, at the temperature)."""
    duration_ps: float = Field(20.0, gt=0)
    """Simulated time of each run, ps."""
    timestep_fs: float = Field(0.5, gt=0)
    """MD time step of the check's runs, fs."""
    temperature_K: float | None = Field(None, gt=0)
    """Temperature of the NVT runs and of the NVE runs' start; default the generator's."""
    walkers: int = Field(1, ge=1)
    """Runs per system and ensemble, from the system's start configurations in turn."""
    min_distance: float = Field(0.5, gt=0)
    """Two atoms closer than this (Å) fail the run."""
    max_drift_meV_per_atom_ps: float = Field(1.0, gt=0)
    """The largest NVE energy drift (absolute slope) that passes."""
    record_interval: int = Field(20, ge=1)
    """Steps between recorded frames (the drift is fitted on them)."""
    label_frames: int = Field(0, ge=0)
    """Frames of the runs (evenly spaced) that the oracle labels, for the ensemble's
    error in production beside its test error; 0: none."""
    seed: int = Field(0, ge=0)
    """Seed of the check's velocities and Langevin noise."""
