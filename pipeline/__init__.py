"""palflow's pipeline: decides what runs where and when; the apps do the work.

::

    cli.py / run.py           the command line: validate every input, make the run directory
          |
    config/                   settings.py (the campaign, loading it), sections.py,
          |                   model_settings.py, models.py, sites.py, preflight.py,
          |                   quick.py (the first look, before heavy imports),
          |                   site_check.py (palflow check), starter.py (palflow init),
          |                   reference.py (docs/settings.md, from the schema)
    engine/coordinator.py     one campaign: wires the pieces, resumes, writes the summary
          |
    engine/core.py            tasks in flight, slots per module, the wait loop, observers
          |  each finished task goes to the agent of its kind
    engine/agents/            oracle.py  generator.py  training.py  inference.py
          |                   what each module submits now, and what its results change
    engine/stopping.py        the stop rules, and what a stop still waits for
    policies/                 selection (the oracle queue), measures, strategies,
          |                   protocols, metrology
    state/campaign_state.py   the bookkeeping, assembled from records.py (walkers,
          |                   members, versions), labels.py (harvest, training snapshot),
          |                   versions.py (publishing) and summary.py
    resume/                   journal.py saves it, restore.py rebuilds it on --resume,
          |                   after mend.py and mend_state.py check every file
    state/rundir.py           every file name of a run (run_files.py: their formats)
    observe/                  the live view, the report (run_data.py, figures.py,
                              quality_figures.py)

The contracts shared with the apps (module labels, failure kinds, the request each
app takes) are in :mod:`palflow.apps.contracts`; the table of apps is
:data:`palflow.apps.APPS`.

One label, from the oracle to the training data, in four files:

1. ``apps/oracle.py`` labels a batch of candidates in the oracle's task and writes
   it to ``oracle/batchNNNNNN.out.npz``;
2. ``engine/agents/oracle.py`` harvests the batch when its task returns;
3. ``state/labels.py`` stores its good labels in ``labels.db``
   (:meth:`~palflow.pipeline.state.labels.LabelStore.harvest`), appends them to the
   label log ``data/labels/`` (``apps/data/label_log.py``) and makes the training
   snapshot the log's newest rows
   (:meth:`~palflow.pipeline.state.labels.LabelStore.write_snapshot`);
4. ``apps/training.py`` reads those rows in the next training task (only the rows
   its worker has not read yet).

``state/rundir.py`` is where each of those file names is spelled.
"""
