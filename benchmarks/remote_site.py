"""``remote_oracle.py``'s site: the laptop site with one oracle worker per oracle slot.

The benchmark's oracle waits (sleeps) for its set cost, as a remote DFT node would,
using no CPU. Each oracle slot stands for a node of its own, so no slot may queue
behind another: the laptop site's single oracle worker would make its two slots
take turns and double the oracle's cost.
"""

import importlib.util
from pathlib import Path

from parsl.config import Config

from palflow.apps.contracts import MODULES

_spec = importlib.util.spec_from_file_location(
    "palflow_laptop_site", Path(__file__).resolve().parent.parent / "site_configs" / "laptop.py"
)
laptop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(laptop)

slots = dict(laptop.slots)
WORKERS = {**laptop.WORKERS, "oracle": slots["oracle"]}

config = Config(
    executors=[laptop.executor(label, WORKERS[label]) for label in MODULES],
    run_dir="runinfo",
    strategy="none",
    usage_tracking=0,
)
