"""On a CUDA device: the ensemble gives the CPU's answers, and a member trains there."""

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT

from palflow.apps.data.dataset import write_dataset
from palflow.apps.models.calculator import predict_structures
from palflow.apps.models.core import load_checkpoint
from palflow.apps.models.schnet.network import ModelSpec, SchNetEnsemble
from palflow.apps.training import _train_member
from palflow.pipeline.config.settings import TrainingSettings
from tests.conftest import need

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def require_cuda():
    need("gpu", torch.cuda.is_available(), "no CUDA device")


def structures(n):
    result = []
    for seed in range(n):
        atoms = bulk("Cu", cubic=True)
        atoms.rattle(0.05, seed=seed)
        atoms.calc = EMT()
        atoms.get_forces()
        result.append(atoms)
    return result


def test_cuda_predictions_match_cpu():
    torch.manual_seed(0)
    model = SchNetEnsemble(ModelSpec(cutoff=5.0, n_features=16, n_interactions=2, n_rbf=8), 4)
    data = structures(3)
    on_cpu = predict_structures(model, data, device="cpu")
    on_gpu = predict_structures(model.to("cuda"), data, device="cuda")
    np.testing.assert_allclose(on_gpu["energy"], on_cpu["energy"], rtol=1e-4)
    np.testing.assert_allclose(
        on_gpu["force_disagreement"], on_cpu["force_disagreement"], rtol=1e-3, atol=1e-6
    )


def test_member_trains_on_cuda(tmp_path):
    write_dataset(tmp_path / "train.npz", structures(8))
    spec = ModelSpec(cutoff=5.0, n_features=16, n_interactions=2, n_rbf=8).to_dict()
    settings = TrainingSettings(
        learning_rate=1e-3, learning_rate_half_life_steps=0, min_task_s=0.0
    ).model_dump()
    result = _train_member(
        0,
        str(tmp_path / "train.npz"),
        None,
        str(tmp_path / "m.pt"),
        spec,
        settings,
        seed=0,
        n_epochs=2,
    )
    assert result["device"].startswith("cuda")
    model, extra = load_checkpoint(tmp_path / "m.pt", device="cpu")
    assert extra["epochs"] == 2
