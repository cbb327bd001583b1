"""tests/acceptance is the package's own suite (pytest_neoxmii/suite), not a copy: collecting that directory
collects the suite's modules, so `pytest tests/acceptance` and `pytest --pyargs pytest_neoxmii.suite` run the
same tests. A directory's own conftest is not consulted for its collector, hence this hook lives here."""
from __future__ import annotations

from pathlib import Path

import pytest

ACCEPTANCE_DIR = Path(__file__).resolve().parent / "acceptance"


class InstalledSuite(pytest.Directory):
    """tests/acceptance: one child, the package of the shipped suite (wherever pytest_neoxmii is imported from)."""

    def collect(self):
        import pytest_neoxmii.suite
        yield pytest.Package.from_parent(self, path=Path(pytest_neoxmii.suite.__file__).resolve().parent)


def pytest_collect_directory(path: Path, parent: pytest.Collector):
    if path.resolve() == ACCEPTANCE_DIR:
        return InstalledSuite.from_parent(parent, path=path)
    return None
