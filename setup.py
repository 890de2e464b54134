"""Package list for setuptools: plugins/ ships as `mergeplug_plugins`, schemas/ as `mergeplug.schemas`.

Automatic discovery cannot rename a folder, so the packages are listed here from the tree; everything else
(metadata, entry points) lives in pyproject.toml.
"""
from setuptools import find_packages, setup

packages = ["mergeplug", "mergeplug.schemas", "mergeplug_plugins"]
packages += [f"mergeplug.{p}" for p in find_packages("mergeplug")]
packages += [f"mergeplug_plugins.{p}" for p in find_packages("plugins")]
setup(packages=packages)
