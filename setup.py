"""Package discovery for palflow, which pyproject.toml cannot express on its own.

The checkout keeps its folders at the top (``pipeline/``, ``apps/``,
``site_configs/``); installed, they are subpackages of one import name, ``palflow``
(``palflow.pipeline``, ``palflow.apps``, ``palflow.site_configs``), so that they
cannot collide with other packages called ``pipeline`` or ``apps``. Every
subpackage below them is found, so a plain ``pip install .`` is whole.
"""

from setuptools import find_packages, setup

FOLDERS = ("pipeline", "apps", "site_configs")

setup(
    packages=[
        f"palflow.{package}"
        for folder in FOLDERS
        for package in [folder, *find_packages(where=".", include=[f"{folder}.*"])]
    ],
    package_dir={f"palflow.{folder}": folder for folder in FOLDERS},
)
