"""The package list, found automatically: ``hyperion`` and its subpackages, and the
compiler passes, which live in ``passes/`` and install as ``hyperion.passes``."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["hyperion", "hyperion.*"])
    + ["hyperion.passes"] + [f"hyperion.passes.{name}" for name in find_packages("passes")],
    package_dir={"hyperion.passes": "passes"},
)
