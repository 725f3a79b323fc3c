"""The pynetdicom pin (we rely on its internals, README: Design notes) and the internals themselves."""

from __future__ import annotations

import tomllib

import pynetdicom
from pynetdicom import Association, _config, dimse_messages
from pynetdicom.transport import ThreadedAssociationServer

from tests.helpers import REPO


def dependencies() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    result = {}
    for spec in project["dependencies"]:
        name = spec.split(">")[0].split("<")[0].split("=")[0].strip()
        result[name] = spec
    return result


def test_pynetdicom_is_pinned_to_the_minor_we_patch() -> None:
    spec = dependencies()["pynetdicom"]
    assert ">=3.0" in spec and "<3.1" in spec
    assert pynetdicom.__version__.startswith("3.0."), pynetdicom.__version__


def test_the_internals_we_rely_on_exist() -> None:
    for knob in ("STORE_RECV_CHUNKED_DATASET", "STORE_SEND_CHUNKED_DATASET", "UNRESTRICTED_STORAGE_SERVICE"):
        assert hasattr(_config, knob), knob
    assert callable(dimse_messages.create_file_meta)  # replaced by pipeline.filemeta
    assert callable(Association._serve_request)  # wrapped by pipeline.association
    assert callable(ThreadedAssociationServer.process_request_thread)  # services.receive


def test_runtime_dependencies_are_the_agreed_ones() -> None:
    names = set(dependencies())
    assert {"pynetdicom", "pydicom", "watchdog", "supervisor", "loguru", "croniter"} <= names
    # no GPL codec (pylibjpeg-libjpeg is GPLv3)
    assert "pylibjpeg-libjpeg" not in names
