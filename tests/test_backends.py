"""Model backends as one extension point: a backend written outside apps/ and
pipeline/, named by import path, runs a real campaign; bad names and keys are refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from ase.db import connect

from palflow.apps.models import registry
from palflow.apps.models.backend import ModelError
from palflow.pipeline.config.settings import CampaignError, load_campaign
from tests.test_coordinator import EXAMPLES, run_campaign

PAIR_BACKEND = textwrap.dedent(
    '''
    """A committee of Morse pair potentials: a backend that lives outside palflow."""

    import dataclasses
    import math

    import numpy as np
    import torch
    from palflow.apps.models.backend import BackendSettings, ModelBackend
    from palflow.apps.models.protocol import common_spec, from_state_dict
    from palflow.apps.models.graph import strain, stress_from_strain
    from pydantic import Field

    BUILT = []  # (n_members, seed) of every fresh ensemble, for the test to read


    @dataclasses.dataclass(frozen=True)
    class PairSpec:
        cutoff: float
        max_z: int = 100

        def to_dict(self):
            return dataclasses.asdict(self)

        @classmethod
        def from_dict(cls, data):
            return cls(**{k: v for k, v in data.items() if k != "name"})


    class PairEnsemble(torch.nn.Module):
        """E = sum over pairs of D (x^2 - 2x) f_cut(r), x = exp(-a (r - r0)), per member."""

        spec_class = PairSpec

        def __init__(self, spec, n_members, device=None, seed=0):
            super().__init__()
            self.spec = spec
            k = n_members
            self.log_depth = torch.nn.Parameter(torch.zeros(k, device=device))
            self.alpha = torch.nn.Parameter(torch.ones(k, device=device))
            self.r0 = torch.nn.Parameter(torch.full((k,), 2.5, device=device))
            self.register_buffer("shift", torch.zeros(k, spec.max_z + 1, device=device))
            if str(device) != "meta":
                BUILT.append((k, seed))
                with torch.no_grad():
                    self.log_depth.normal_(-1.0, 0.3)
                    self.alpha.uniform_(1.0, 2.0)
                    self.r0.uniform_(2.3, 2.7)

        @property
        def n_members(self):
            return self.alpha.shape[0]

        def forward(self, batch, compute_forces=True, compute_stress=False):
            k = self.n_members
            positions = batch.positions.detach().float().unsqueeze(0).repeat(k, 1, 1)
            derivatives = compute_forces or compute_stress
            with torch.set_grad_enabled(torch.is_grad_enabled() or derivatives):
                positions.requires_grad_(derivatives)
                shift = batch.edge_shift.float()
                strained, displacement = positions, None
                if compute_stress:
                    strained, shift, displacement = strain(batch, positions, shift)
                vectors = strained[:, batch.edge_dst] - strained[:, batch.edge_src] + shift
                r = torch.linalg.vector_norm(vectors, dim=-1)
                x = torch.exp(-self.alpha[:, None] * (r - self.r0[:, None]))
                cut = 0.5 * (torch.cos(r * math.pi / self.spec.cutoff) + 1)
                cut = cut * (r < self.spec.cutoff)
                pair = torch.exp(self.log_depth)[:, None] * (x * x - 2 * x) * cut
                atomic = self.shift[:, batch.numbers].float().index_add(
                    1, batch.edge_src, 0.5 * pair
                )
                energy = atomic.new_zeros(k, batch.n_structures).index_add_(
                    1, batch.structure_index, atomic
                )
                out = {"energy": energy}
                if derivatives:
                    inputs = [positions] + ([displacement] if compute_stress else [])
                    grads = torch.autograd.grad(
                        energy.sum(), inputs, create_graph=self.training, allow_unused=True
                    )
                    if compute_forces:
                        out["forces"] = -grads[0]
                    if compute_stress:
                        out["stress"] = stress_from_strain(batch, grads[1], displacement)
            return out

        @torch.no_grad()
        def fit_energy_reference(self, structures):
            counts = np.array([np.bincount(a.numbers, minlength=101) for a in structures], float)
            energies = np.array([a.calc.results["energy"] for a in structures])
            present = np.flatnonzero(counts.sum(axis=0))
            coef, *_ = np.linalg.lstsq(counts[:, present], energies, rcond=None)
            self.shift[:, present] = torch.as_tensor(coef, dtype=self.shift.dtype)

        def member(self, index):
            state = {n: v[index : index + 1].clone() for n, v in self.state_dict().items()}
            return from_state_dict(type(self), self.spec, 1, state, training=self.training)

        @classmethod
        def stack(cls, members):
            spec = common_spec(members)
            states = [m.state_dict() for m in members]
            state = {n: torch.cat([s[n] for s in states]) for n in states[0]}
            return from_state_dict(cls, spec, len(members), state, members[0].training)


    class PairSettings(BackendSettings):
        cutoff: float = Field(4.0, gt=0)


    class PairBackend(ModelBackend):
        settings = PairSettings

        @classmethod
        def resolve_spec(cls, settings, given):
            return {"cutoff": settings.cutoff}

        @classmethod
        def ensemble_class(cls):
            return PairEnsemble
    '''
)


@pytest.fixture
def pair_backend(tmp_path):
    """The import path of the pair backend, written to a file outside the tree."""
    path = tmp_path / "pair_backend.py"
    path.write_text(PAIR_BACKEND)
    return f"{path}:PairBackend"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_backend_outside_the_tree_runs_a_campaign(tmp_path, pair_backend):
    from palflow.apps.models.core import load_checkpoint

    campaign = load_campaign(
        EXAMPLES / "cu_emt.toml",
        model__name=pair_backend,
        model__n_members=3,
        model__cutoff=4.5,
        stop__max_labels=12,
        stop__max_wall_s=200.0,
        stop__final_training_s=0.0,
        training__min_task_s=0.0,
        training__epochs_per_task=4,
        generator__steps_per_task=20,
        generator__n_walkers=2,
        initial__n_structures=6,
        test__n_structures=6,
        oracle__batch_size=3,
    )
    assert type(campaign.model).__name__ == "PairSettings"
    run, summary = run_campaign(tmp_path, campaign)

    assert summary["labels"] == 12
    assert len(list(connect(run.labels_db).select())) == 18  # 6 initial + 12 active
    assert summary["versions"] >= 1
    state = json.loads((run.root / "state.json").read_text())
    assert state["model_spec"] == {"name": pair_backend, "cutoff": 4.5}
    versions = sorted((run.root / "models").glob("ensemble.v*.pt"))
    assert versions
    payload = torch.load(versions[-1], weights_only=True)
    assert payload["model"] == pair_backend
    model, extra = load_checkpoint(versions[-1])
    assert type(model).__name__ == "PairEnsemble" and model.n_members == 3
    assert type(model).__module__ == "palflow_user.pair_backend"
    # The members were built by the backend (one fresh member per seed) and trained.
    built = sys.modules["palflow_user.pair_backend"].BUILT
    assert {k for k, _ in built} == {1} and len({seed for _, seed in built}) == 3
    # Training moved every member away from the weights it was built with.
    backend = registry.backend(pair_backend)
    for k in range(3):
        fresh = backend.new_ensemble(state["model_spec"], 1, seed=campaign.seed * 1000 + k)
        names = ("log_depth", "alpha", "r0")
        assert any(not torch.allclose(getattr(model, n)[k], getattr(fresh, n)[0]) for n in names)
    assert [entry[2] for entry in summary["test_force_mae"]]  # inference ran on it


def test_a_backend_whose_requirements_are_missing_is_refused(pair_backend, monkeypatch):
    from ase.build import bulk

    from palflow.pipeline.config.models import check_model

    campaign = load_campaign(None, model__name=pair_backend)
    backend = registry.backend(pair_backend)
    copper = bulk("Cu", cubic=True)
    monkeypatch.setattr(backend, "requirements", ("numpy", "palflow-no-such-distribution"))
    with pytest.raises(ModelError, match="needs palflow-no-such-distribution, which this"):
        check_model(campaign, copper)
    monkeypatch.setattr(backend, "requirements", ("numpy", "torch"))
    check_model(campaign, copper)


def test_the_import_path_chooses_the_backends_settings(pair_backend):
    campaign = load_campaign(None, model__name=pair_backend, model__cutoff=3.0)
    assert type(campaign.model).__name__ == "PairSettings"
    assert campaign.model.cutoff == 3.0 and campaign.model.n_members == 4
    assert registry.backend(pair_backend).settings is type(campaign.model)
    dumped = campaign.model.model_dump()
    assert dumped == {"name": pair_backend, "n_members": 4, "cutoff": 3.0}
    again = load_campaign(None, **{f"model__{k}": v for k, v in dumped.items()})
    assert again.model == campaign.model


def test_an_unknown_backend_name_is_a_clear_error():
    with pytest.raises(CampaignError, match=r"unknown model.name 'schnett': choose one of"):
        load_campaign(None, model__name="schnett")
    with pytest.raises(ModelError, match="unknown model.name 'schnett'"):
        registry.backend("schnett")


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("no_such_module:Backend", "does not import"),
        ("palflow.apps.models.core:load_checkpoint", "not a subclass of"),
    ],
)
def test_an_import_path_that_is_no_backend_is_refused(path, reason):
    with pytest.raises(CampaignError, match=reason):
        load_campaign(None, model__name=path)


@pytest.mark.parametrize(
    ("name", "key", "message"),
    [
        ("schnet", "r_max", "r_max is not a setting of model.name = 'schnet'"),
        ("mace", "n_rbf", "n_rbf is not a setting of model.name = 'mace'"),
        ("pair", "n_features", "n_features is not a setting of model.name = "),
        ("pair", "n_fetaures", r"unknown key 'model\.n_fetaures'"),
    ],
)
def test_a_key_of_another_backend_is_an_error(pair_backend, name, key, message):
    name = pair_backend if name == "pair" else name
    with pytest.raises(CampaignError, match=message):
        load_campaign(None, model__name=name, **{f"model__{key}": 4})


def test_the_pipeline_imports_no_model_code():
    code = (
        "import sys, palflow.pipeline.engine.coordinator, palflow.pipeline.config.models, "
        "palflow.pipeline.resume.warm_start, palflow.apps.models.registry; "
        "from palflow.pipeline.config.settings import load_campaign; "
        "load_campaign(None, model__name='mace'); "
        "print(sorted(m for m in ('torch', 'mace', 'e3nn') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
