"""Package discovery, the one thing pyproject.toml cannot express here.

The compiler passes live in the top-level ``passes/`` folder and install as
``hyperion.passes`` (``[tool.setuptools.package-dir]`` in pyproject.toml). Setuptools'
automatic discovery (``[tool.setuptools.packages.find]``) names packages after their folders,
so it finds ``passes.ordering`` where ``hyperion.passes.ordering`` is meant; this file finds
both trees and prefixes the second. New subpackages are picked up without being listed.
"""

from setuptools import find_packages, setup

PASSES = "hyperion.passes"

setup(packages=[
    *find_packages(include=["hyperion", "hyperion.*"]),
    PASSES,
    *(f"{PASSES}.{name}" for name in find_packages("passes")),
])
