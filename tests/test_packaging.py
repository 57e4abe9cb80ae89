"""What the wheel ships is found without a hand-written list.

setup.py ships every folder of ``hyperion/`` and ``passes/`` that has an ``__init__.py``, and
pyproject.toml the package-data files it names. These checks are cheap; ``.ci/run`` builds the
wheel itself, installs it into a throw-away venv and runs ``hyperion demo`` from there.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from hyperion.tools.demo import BUNDLED_DEMO
from tests.conftest import REPO, fixture_path

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _package_folder(name: str) -> Path:
    """The source folder of package ``name``, through pyproject's package-dir mapping."""
    for prefix, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        if name == prefix or name.startswith(prefix + "."):
            return REPO / folder / Path(*name[len(prefix):].split(".")[1:])
    return REPO / Path(*name.split("."))


def test_every_folder_of_python_modules_is_a_package_and_ships() -> None:
    # find_packages() skips a folder without __init__.py, and the wheel would lack its modules.
    for root in (REPO / "hyperion", REPO / "passes"):
        folders = {p.parent for p in root.rglob("*.py") if "__pycache__" not in p.parts}
        assert [f for f in sorted(folders) if not (f / "__init__.py").is_file()] == []


def test_the_passes_install_as_hyperion_passes() -> None:
    assert _package_folder("hyperion.passes.ordering") == REPO / "passes" / "ordering"
    import hyperion.passes.ordering.order as order

    assert Path(order.__file__).resolve().is_relative_to(REPO / "passes")


def test_every_package_data_pattern_names_existing_files() -> None:
    for package, patterns in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        for pattern in patterns:
            assert list(_package_folder(package).glob(pattern)), f"{package}: nothing matches {pattern!r}"


def test_the_demo_runs_the_packaged_model_the_tests_use() -> None:
    assert BUNDLED_DEMO.is_file()
    assert Path(str(BUNDLED_DEMO)).resolve() == fixture_path("demo").resolve()
    assert fixture_path("demo").is_relative_to(REPO / "hyperion")
