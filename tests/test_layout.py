"""The layout's rules (README, Development: Layout), checked on the source itself."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

BOUNDARY = REPO / "pipeline" / "dicom"


def modules(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (anywhere in the file)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def calls_to(path: Path, owner: str, attributes: set[str]) -> list[int]:
    """Line numbers of ``owner.<attribute>`` uses in ``path``."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute) and node.attr in attributes
            and isinstance(node.value, ast.Name) and node.value.id == owner]


def test_only_the_boundary_package_imports_pynetdicom():
    offenders = [str(p.relative_to(REPO)) for p in modules("pipeline", "services")
                 if not p.is_relative_to(BOUNDARY)
                 and any(n == "pynetdicom" or n.startswith("pynetdicom.") for n in imported(p))]
    assert offenders == []


def test_the_library_never_imports_the_daemons():
    offenders = [str(p.relative_to(REPO)) for p in modules("pipeline")
                 if any(n == "services" or n.startswith("services.") for n in imported(p))]
    assert offenders == []


def test_only_the_spool_renames_replaces_or_links_files():
    offenders = {str(p.relative_to(REPO)): lines for p in modules("pipeline", "services")
                 if p != REPO / "pipeline" / "spool.py"
                 and (lines := calls_to(p, "os", {"rename", "replace", "link", "renames"}))}
    assert offenders == {}


SNAPSHOT = """
import importlib, pkgutil, sys
import pydicom.config, pydicom.filewriter
import pynetdicom
from pynetdicom import _config, acse, association, dimse, dimse_messages, dul, transport

def snapshot():
    state = {name: value for name, value in vars(_config).items() if name.isupper()}
    for owner in (acse.ACSE, association.Association, dimse.DIMSEServiceProvider,
                  dul.DULServiceProvider, transport.AssociationSocket,
                  transport.AssociationServer, transport.RequestHandler):
        state.update({f"{owner.__name__}.{k}": v for k, v in vars(owner).items()})
    state["dimse_messages.encode"] = dimse_messages.encode
    state["pydicom.filewriter.write_file_meta_info"] = pydicom.filewriter.write_file_meta_info
    state["pydicom.settings"] = (pydicom.config.settings.reading_validation_mode,
                                 pydicom.config.settings.writing_validation_mode)
    return state

before = snapshot()
import pipeline, services
for package in (pipeline, services):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
after = snapshot()
changed = sorted(k for k in before.keys() | after.keys() if before.get(k) is not after.get(k)
                 and before.get(k) != after.get(k))
print(changed)
"""


def test_importing_every_module_patches_nothing():
    """Patches are installed by a daemon's ``main`` (``pipeline.dicom.patches.install``),
    never as a side effect of an import: a tool or test importing our modules gets
    pynetdicom and pydicom as released."""
    result = subprocess.run([sys.executable, "-c", SNAPSHOT], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def without_switches() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW_")}


def test_installing_the_patches_is_seen_by_the_snapshot():
    """The check above can fail: after ``patches.install`` the snapshot differs."""
    script = SNAPSHOT.replace("after = snapshot()",
                              "from pipeline.dicom import patches\n"
                              "patches.install('send')\nafter = snapshot()")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env=without_switches())
    assert result.returncode == 0, result.stderr
    changed = ast.literal_eval(result.stdout.strip())
    assert "STORE_SEND_CHUNKED_DATASET" in changed
    assert "DULServiceProvider.run_reactor" in changed
