"""Site configs: every shipped site honours the executor-label contract."""

from pathlib import Path

import pytest

from palflow.apps.contracts import MODULES
from palflow.pipeline.config.sites import SITE_DIR, SiteError, load_site, shipped_sites

SITES = shipped_sites()

HEADER = "from parsl.config import Config\nfrom parsl.executors.threads import ThreadPoolExecutor\n"


def write_site(tmp_path: Path, labels) -> Path:
    path = tmp_path / "site.py"
    executors = ", ".join(f"ThreadPoolExecutor(label={label!r})" for label in labels)
    path.write_text(HEADER + f"config = Config(executors=[{executors}])\n")
    return path


def test_only_the_cluster_template_holds_placeholders():
    from palflow.pipeline.config.site_check import placeholders

    assert [name for name in SITES if placeholders(SITE_DIR / name)] == ["hpc.py"]
    with pytest.raises(SiteError, match="3 placeholder"):
        load_site("hpc.py")


@pytest.mark.parametrize("name", SITES)
def test_shipped_sites_define_every_label_once(name):
    # hpc.py is a template: its placeholders are for the user's copy to fill in.
    site = load_site(name, allow_placeholders=True)
    assert sorted(e.label for e in site.config.executors) == sorted(MODULES)
    assert set(site.slots) == set(MODULES)


@pytest.mark.parametrize("name", SITES)
def test_shipped_htex_sites_are_encrypted(name):
    from parsl.executors import HighThroughputExecutor

    for executor in load_site(name, allow_placeholders=True).config.executors:
        if isinstance(executor, HighThroughputExecutor):
            assert executor.encrypted, f"{name}: executor {executor.label} is not encrypted"


def test_site_lacking_a_label_names_file_and_label(tmp_path):
    path = write_site(tmp_path, ["oracle", "generator", "train"])
    with pytest.raises(SiteError, match=r"site\.py.*'infer'"):
        load_site(str(path))


def test_site_repeating_a_label_is_refused(tmp_path):
    path = write_site(tmp_path, ["oracle", "generator", "train", "infer", "train"])
    with pytest.raises(SiteError, match=r"site\.py: the Parsl config is invalid.*label='train'"):
        load_site(str(path))


def test_site_that_does_not_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import not_a_module_anywhere\n")
    with pytest.raises(SiteError, match=r"broken\.py: the site file does not import"):
        load_site(str(path))


def test_site_without_config(tmp_path):
    path = tmp_path / "empty.py"
    path.write_text("x = 1\n")
    with pytest.raises(SiteError, match="neither 'config'"):
        load_site(str(path))


def test_unknown_site_name_lists_the_shipped_ones():
    with pytest.raises(SiteError, match="laptop.py"):
        load_site("no-such-site")
