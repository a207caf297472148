"""A user-defined metrology: the worst held-out structures, not only the average.

An MAE can hide a few structures the potential gets badly wrong, and those are the
ones that break MD. Any callable taking an :class:`palflow.pipeline.policies.protocols.Evaluation`
and returning named numbers is a :class:`palflow.pipeline.policies.protocols.Metrology`. Named from
a campaign file as::

    [metrology]
    plugins = ["plugins/worst_case.py:WorstCase"]

Its numbers go into ``metrics.jsonl`` beside the built-in ones.
"""

import numpy as np


class WorstCase:
    def __call__(self, evaluation):
        errors = evaluation.force_error
        if len(errors) == 0:
            return {}
        return {
            "force_error_max": float(errors.max()),
            "force_error_p90": float(np.percentile(errors, 90)),
        }
