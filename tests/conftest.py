"""Shared fixtures. Helpers that test modules import live in qemu_helpers.py."""

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qemu_helpers  # noqa: E402

# The `mounter` fixture (and its finalizers) for every test module.
pytest_plugins = ["mount_fixtures"]


def pytest_configure(config):
    # The suite is meaningless without QEMU's tools; fail loudly rather than skip.
    missing = [t for t in ("qemu-img", "qemu-io") if shutil.which(t) is None]
    if missing:
        raise pytest.UsageError(
            f"missing {', '.join(missing)}: run ./scripts/test.sh (it installs qemu-utils)"
        )


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A fresh, empty directory for one test's images."""
    d = tmp_path / "img"
    d.mkdir()
    return d


class Matrix:
    """Builds each coverage-matrix case once per session (read-only users only:
    tests that modify images must build their own with ``build_case``)."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[str, str] = {}

    def get(self, name: str) -> str:
        if name not in self._built:
            self._built[name] = qemu_helpers.build_case(name, self.root / name)
        return self._built[name]

    def directory(self, name: str) -> Path:
        self.get(name)
        return self.root / name


@pytest.fixture(scope="session")
def matrix(tmp_path_factory) -> Matrix:
    return Matrix(tmp_path_factory.mktemp("matrix"))


@pytest.fixture
def qcowfs():
    """Run the CLI like a user: ``qcowfs(*args) -> CompletedProcess`` (text)."""
    return qemu_helpers.run_qcowfs
