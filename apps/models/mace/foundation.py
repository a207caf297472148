"""What palflow says of a ``model.foundation`` file it cannot find: where it looked,
and what to give instead; for a bare name such as ``"medium"`` or ``"mace-mp-0"``
(which MACE's own ``mace_mp()`` would download), that it is a name, not a file.
Standard library only, so the pre-flight can say it before torch and MACE load."""

from __future__ import annotations

import os


def missing_foundation(path: str, campaign_folder: str | os.PathLike | None = None) -> str:
    """The message for a ``model.foundation`` file that does not exist: where it was
    looked for, and what to give instead.

    A relative path is taken from the campaign file's folder when the file is there
    (:func:`palflow.pipeline.config.settings.load_campaign`), else from the current
    folder; ``campaign_folder``, when known, is named too.
    """
    here = os.path.abspath(path)
    if os.path.isabs(path):
        looked = path
    elif campaign_folder is None:
        looked = (
            f"{here} (in the current folder; a relative path is first looked for beside "
            "the campaign file)"
        )
    else:
        beside = os.path.join(os.path.abspath(campaign_folder), path)
        if beside == here:
            looked = f"{here} (beside the campaign file, which is the current folder)"
        else:
            looked = f"{beside} (beside the campaign file) and {here} (in the current folder)"
    if _is_a_name(path):
        return (
            f"model.foundation {path!r} is a name, not a file (looked for {looked}): "
            "palflow downloads nothing, so the names by which MACE's mace_mp() and "
            "mace_off() fetch their models from the internet ('small', 'medium', "
            "'mace-mp-0', ...) will not do. Download the model file beforehand on a machine "
            "with internet access (MACE-MP-0, MACE-OFF23 from the MACE project's releases) "
            'and give its path, e.g. model.foundation = "mace-mp-0-small.model"'
        )
    return (
        f"model.foundation {path!r} does not exist: looked for {looked}. Give the path "
        "of a MACE model file: one that a palflow MACE run wrote (models/"
        "ensemble.vNNNNN.memberK.model in its run directory, or ensemble.memberK.model "
        "from palflow export), or a MACE foundation model (MACE-MP-0, MACE-OFF23 from "
        "the MACE project's releases) downloaded beforehand on a machine with internet "
        "access; palflow downloads nothing"
    )


def _is_a_name(path: str) -> bool:
    """Whether ``path`` reads as a model's name rather than a file's path: no folder
    and no suffix (``"medium"``, ``"mace-mp-0"``, ``"small-0b3"``)."""
    return "/" not in path and os.sep not in path and "." not in path
