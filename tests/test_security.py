"""Nothing is unpickled from files a user did not write; run directories are private."""

import pickle

import numpy as np
import pytest
import torch

from palflow.apps.data.dataset import read_arrays
from palflow.apps.models.core import load_checkpoint
from palflow.pipeline.state.rundir import RunDirectory


class Exploit:
    def __reduce__(self):
        return (print, ("this ran while loading a file",))


def test_run_directory_is_private(tmp_path):
    run = RunDirectory.create(tmp_path / "run")
    assert run.root.stat().st_mode & 0o777 == 0o700


def test_checkpoint_with_code_in_it_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": "schnet", "state_dict": {}, "extra": Exploit()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)
    assert "this ran" not in capsys.readouterr().out


def test_dataset_with_objects_in_it_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, candidate_id=np.array([Exploit()], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        read_arrays(path)


def test_run_directory_appears_whole_with_its_campaign(tmp_path):
    run = RunDirectory.create(tmp_path / "run", {"name": "x"})
    assert (run.root / "campaign.json").read_text().count('"name": "x"') == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "no building leftovers"
