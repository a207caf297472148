"""palflow's pipeline: decides what runs where and when; the apps do the work.

::

    cli.py / run.py        the command line: validate every input, make the run directory
          |
    coordinator.py         one campaign: wires the pieces, resumes, writes the summary
          |
    engine.py              tasks in flight, slots per module, the wait loop, observers
          |  each finished task goes to the agent of its kind
    agents/                oracle.py  generator.py  training.py  inference.py
          |                what each module submits now, and what its results change
    stopping.py            the stop rules, and what a stop still waits for
    campaign_state.py      the bookkeeping: labels, walkers, members, versions
    journal.py             saving it, and rebuilding it on --resume
    rundir.py              every file name of a run, and reading and writing them

Selection lives in ``selection.py`` (the oracle queue), ``measures.py``,
``strategies.py``, ``protocols.py`` and ``metrology.py``; settings in
``settings.py``; sites in ``sites.py``; the live view, the report and its figures
in ``live.py``, ``report.py`` and ``figures.py``. The contracts shared with the apps
(module labels, failure kinds, the request each app takes) are in
:mod:`palflow.apps.contracts`.

One label, from the oracle to the training data: ``agents/oracle.py`` submits a
batch and harvests its result; ``campaign_state.py`` stores it
(:meth:`~palflow.pipeline.state.campaign_state.CampaignState.harvest`) and writes the training
snapshot that the next training task reads; ``rundir.py`` names both files.
"""
