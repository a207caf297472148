"""The campaign's final stage: the MD check of ``[validate]`` once a campaign stops
(``validate.after_campaign``), its verdict in the summary and the report."""

from __future__ import annotations

import logging
from typing import Any

from palflow import apps
from palflow.pipeline.config.settings import Campaign
from palflow.pipeline.engine.validation import summary_lines, validate_run
from palflow.pipeline.state.rundir import SUMMARY_FILE, RunDirectory

logger = logging.getLogger(__name__)


def validate_after(campaign: Campaign, run: RunDirectory, summary: dict[str, Any]) -> None:
    """The campaign's final stage (``validate.after_campaign``): the MD check of its
    newest ensemble on the site's generator executor; a failed check fails the run."""
    try:
        verdict = validate_run(run.root, apps=apps, campaign=campaign)
    except Exception as error:  # the campaign's files stay; the check's failure fails it
        logger.exception("the MD check could not run")
        summary["validate"] = {
            "passed": False,
            "lines": [f"could not run: {type(error).__name__}: {error}"[:300]],
        }
    else:
        summary["validate"] = {"passed": verdict["passed"], "lines": summary_lines(verdict)}
    if not summary["validate"]["passed"]:
        summary.update(
            failed=True,
            failure="the MD check failed: " + " | ".join(summary["validate"]["lines"]),
            exit_status=1,
        )
    run.write_json(SUMMARY_FILE, summary)  # palflow run then builds the final report
