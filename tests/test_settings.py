"""Campaign settings: defaults, overrides, and clear errors on bad input."""

from pathlib import Path

import pytest

from palflow.pipeline.config.settings import CampaignError, load_campaign

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_default_campaign_is_ethanol_with_gfn2_xtb():
    campaign = load_campaign()
    assert campaign.system.structure == "CH3CH2OH"
    assert campaign.oracle.calculator == "xtb.ase.calculator:XTB"
    assert campaign.oracle.kwargs == {"method": "GFN2-xTB"}
    assert campaign.model.n_members >= 4


def test_toml_file_overrides_only_what_it_names(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[stop]\nmax_labels = 7\n[oracle]\nbatch_size = 3\n")
    campaign = load_campaign(path)
    assert campaign.stop.max_labels == 7
    assert campaign.oracle.batch_size == 3
    assert campaign.stop.max_wall_s == load_campaign().stop.max_wall_s


def test_keyword_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[stop]\nmax_labels = 7\n")
    assert load_campaign(path, stop__max_labels=9).stop.max_labels == 9


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[stop]\nmax_lables = 7\n", "stop.max_lables"),
        ("[oracel]\nbatch_size = 2\n", "oracel"),
        ('[oracle]\nbatch_size = "four"\n', "oracle.batch_size"),
        ("[stop]\nmax_labels = 0\n", "stop.max_labels"),
        ("[model]\nn_members = 1\n", "model.n_members"),
        ('[generator]\nintegrator = "leapfrog"\n', "generator.integrator"),
    ],
)
def test_bad_settings_name_the_key(tmp_path, text, named):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(CampaignError, match=named.replace(".", r"\.")):
        load_campaign(path)


def test_malformed_toml_is_a_campaign_error(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[stop\nmax_labels = 3")
    with pytest.raises(CampaignError, match="not valid TOML"):
        load_campaign(path)


def test_missing_file_is_a_campaign_error(tmp_path):
    with pytest.raises(CampaignError, match="not found"):
        load_campaign(tmp_path / "nope.toml")


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_shipped_examples_validate(name):
    load_campaign(EXAMPLES / name)


@pytest.mark.parametrize("name", ["schnet", "mace"])
def test_a_dumped_campaign_validates_again(name):
    """campaign.json is a dump of the settings; --resume validates it again."""
    from palflow.pipeline.config.settings import campaign_from_dict

    campaign = load_campaign(None, model__name=name)
    again = campaign_from_dict(campaign.model_dump(), "campaign.json")
    assert again == campaign
