"""The run directory's lock: one coordinator at a time on a run (an ``flock`` on
``RUN/.lock``, which the kernel drops when the process ends, however it ends)."""

from __future__ import annotations

from pathlib import Path

from palflow.apps.errors import InputError

LOCK_FILE = ".lock"


class RunDirectoryError(InputError):
    """A run directory cannot be created, reopened or locked as asked."""


class RunLock:
    """The lock part of :class:`~palflow.pipeline.state.rundir.RunDirectory`."""

    root: Path

    def lock(self) -> None:
        """Hold an exclusive lock on the run directory while this process lives.

        The kernel drops the lock when the process ends, however it ends, so a
        killed coordinator never leaves a stale lock behind.

        Raises
        ------
        RunDirectoryError
            When another coordinator holds it.
        """
        import fcntl

        if getattr(self, "_lock_handle", None) is not None:
            return  # held already (a resume locks before it mends)
        self._lock_handle = open(self.root / LOCK_FILE, "w")  # noqa: SIM115 (held for life)
        try:
            fcntl.flock(self._lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_handle.close()
            self._lock_handle = None
            raise RunDirectoryError(
                f"another coordinator is running on {self.root}: stop it first"
            ) from None

    def unlock(self) -> None:
        """Release the lock of :meth:`lock` (the campaign is over: readers may now say
        how it ended); nothing when not held."""
        import fcntl

        handle = getattr(self, "_lock_handle", None)
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
            self._lock_handle = None

    def is_locked(self) -> bool:
        """Whether a coordinator holds the lock on this run directory now."""
        import fcntl

        try:
            handle = open(self.root / LOCK_FILE)  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            return False
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
        return False
