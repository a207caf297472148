"""palflow's errors: one base class, a subclass for each kind of bad input.

The command line (:mod:`palflow.pipeline.run`) turns an :class:`InputError` (and
pydantic's ``ValidationError``) into exit status 2 with its one-line message and
nothing created; any other exception is a failure of palflow itself or of a
campaign, exit status 1, with its traceback in the run's log.

::

    PalflowError
    ├── InputError                  bad input: exit 2, nothing created
    │   ├── SettingsError           a campaign file or setting
    │   │   └── CampaignError       (palflow.pipeline.config.settings)
    │   ├── SiteError               (palflow.pipeline.config.sites)
    │   ├── RunDirectoryError       (palflow.pipeline.state.rundir)
    │   ├── StructureError          a start structure or a labelled file
    │   ├── CalculatorError         the oracle's calculator spec
    │   ├── PluginError             a generator, measure, query or metrology plug-in
    │   ├── ModelError              (palflow.pipeline.config.models)
    │   └── WarmStartError          (palflow.pipeline.resume.warm_start)
    └── OracleError                 an oracle could not label a structure: a recorded
        └── BadLabel                outcome of a labelling task, not bad input
                                    (palflow.apps.oracles.calculators)

Each class lives where its errors are raised; the kinds without such a home are
defined here. :class:`InputError` is also a ``ValueError`` and :class:`OracleError`
a ``RuntimeError``, as the classes they replace were. This module imports nothing,
so that both ``palflow.apps`` and ``palflow.pipeline`` may read it.
"""

from __future__ import annotations


class PalflowError(Exception):
    """The base of every error palflow raises on purpose."""


class InputError(PalflowError, ValueError):
    """Bad input: the message names the problem and the fix, on one line."""


class SettingsError(InputError):
    """A campaign file or a campaign setting is invalid."""


class StructureError(InputError):
    """A start structure or a labelled file cannot be read, or is unfit to start from."""


class CalculatorError(InputError):
    """The oracle's calculator does not import, or cannot give what palflow needs."""


class PluginError(InputError, ImportError):
    """Something named by import path (a plug-in: generator, measure, query, metrology;
    a calculator; a model backend) is missing or broken. Also an ``ImportError``, so
    that code expecting one from an import keeps working."""


class OracleError(PalflowError, RuntimeError):
    """An oracle could not label a structure: recorded with its reason, never bad input."""
