"""A user-defined query: candidates scored by the newest ensemble first.

Candidates wait in the queue with the score of the ensemble version that last
looked at them. This query trusts fresh scores over stale ones: it sorts by
version, newest first, then by score. No base class is needed; a ``select`` method
of the right shape makes it a :class:`palflow.pipeline.policies.protocols.Query`. Named from a
campaign file as::

    [selection]
    query = "plugins/fresh_first.py:FreshFirst"
"""


class FreshFirst:
    def select(self, candidates, size, context):
        ranked = sorted(candidates, key=lambda c: (c.version, c.rank), reverse=True)
        return ranked[:size]
