"""Parsl apps of palflow, one per kind of task, each bound to its executor label.

Each app is a plain function with a leading underscore in its own module, wrapped
once here. Tests and the serial baseline call the plain functions; campaigns call
these wrappers, which return Parsl futures. The executor label is the only link
between an app and a site config.
"""

from parsl import python_app

from apps.generator import _run_md
from apps.inference import _evaluate_test, _score_candidates
from apps.mpi_check import _mpi_ranks_check
from apps.oracle import _label_batch, _oracle_md
from apps.training import _train_member

label_batch = python_app(_label_batch, executors=["oracle"])
oracle_md = python_app(_oracle_md, executors=["oracle"])
run_md = python_app(_run_md, executors=["generator"])
train_member = python_app(_train_member, executors=["train"])
score_candidates = python_app(_score_candidates, executors=["infer"])
evaluate_test = python_app(_evaluate_test, executors=["infer"])
mpi_ranks_check = python_app(_mpi_ranks_check, executors=["oracle"])

__all__ = [
    "evaluate_test",
    "label_batch",
    "mpi_ranks_check",
    "oracle_md",
    "run_md",
    "score_candidates",
    "train_member",
]
