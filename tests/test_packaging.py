"""The pynetdicom pin (we rely on its internals, README: Design notes) and the internals themselves."""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
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


def test_pynetdicom_is_pinned_exactly() -> None:
    assert dependencies()["pynetdicom"].replace(" ", "") == "pynetdicom==3.0.4"
    assert pynetdicom.__version__ == "3.0.4", pynetdicom.__version__


#: pynetdicom 3.0.4 code that pipeline/dicom/ (reactors.py, commands.py,
#: fastpath.py, pdu_guard.py, dimse_cap.py, scu.py, transfer.py, filemeta.py) and scp_server.py
#: replace, wrap or rely on (``_bind_defaults``: it reads ``_config.LOG_HANDLER_LEVEL``,
#: set by fastpath.py instead of replacing it): "module:qualname" ->
#: sha256 of its source. A new pynetdicom must be reviewed before the pin moves.
UPSTREAM_SHA256 = {
    "pynetdicom.dul:DULServiceProvider.__init__":
        "be54871719b08ab1f48b982af85137f6a3623f4011408b00f7638cc289d2e20b",
    "pynetdicom.dul:DULServiceProvider.run_reactor":
        "61c299b9a930fb8740258c5518eed55255153ee890a826bed3d3483b42e1b110",
    "pynetdicom.dul:DULServiceProvider.stop_dul":
        "6c62f0d0cd238affa1ee653ca676a100a29acb3e5f09bf32ab3e3fc9f8015198",
    "pynetdicom.dul:DULServiceProvider.kill_dul":
        "d64f51d35ae851e0fa8fcd356521b0d3022914b9be5f243936bcafb9c2a8ff16",
    "pynetdicom.dul:DULServiceProvider._read_pdu_data":
        "c5f07708cfb78a70d039d5f8eac54258e16b76a3a5ed016a9affaf4ed5aa9134",
    "pynetdicom.dul:DULServiceProvider._process_recv_primitive":
        "e60d44a78a9f3a2d44fa62763460966bcff2af74bfa56d8834ec051b33dfb385",
    "pynetdicom.dul:DULServiceProvider._is_transport_event":
        "a192323b769ecd4ab1349db0b819516a7dce2d42fc65d8bdec919984e5ebbab0",
    "pynetdicom.dimse:DIMSEServiceProvider.__init__":
        "177e8892e786522117fb368d2cee67ee679445c1065f28622e2016c70d6a927c",
    "pynetdicom.dimse:DIMSEServiceProvider.send_msg":
        "bc8c411d046c95f8a31fc28ad24c1338630ea7acde3a7505eb54858f487f35b9",
    "pynetdicom.dimse:DIMSEServiceProvider.get_msg":
        "48800bf590eac138e527164cecf580ad041ec404a316b1d420eb843f48a83f9b",
    "pynetdicom.dimse_messages:DIMSEMessage.encode_msg":
        "e5951f59c62b07dc3739b21be9dc592ac3756a245309aaf0202e04eb43f6b0d5",
    "pynetdicom.dsutils:encode":
        "afc29847f6a2c4982f2b6d57084c17795a75f0cdffdaad1033c7de7651b6dcbe",
    "pynetdicom.dsutils:create_file_meta":
        "a7bea44d24aa18d967bcf40faf92be5c409b2c955923b36b37f22a965dc8992e",
    "pynetdicom.dimse_messages:DIMSEMessage.decode_msg":
        "4a6a0156bb315c5cadc7db2b977b77385716c0e9d281d6a10ab4d0418897a8b6",
    "pynetdicom.acse:ACSE.negotiate_association":
        "6177ad4192712dd41bfb7ee5af86ba7c34984b2c116626d9afc4c54727eacfdc",
    "pynetdicom.association:Association._run_reactor":
        "304c896561674fdc8a8c3c87ee41d63ef83f16942a44b64e545dce4a5370c0d1",
    "pynetdicom.association:Association._bind_defaults":
        "9958fd57e00e0d53391981b13adb3ad84220bd7df19790cff526907c83b7e66c",
    "pynetdicom.association:Association._serve_request":
        "b2b830a81a99d40aa450fb580e1b69c3b7d7111c603502f2c215561564bdd6ab",
    "pynetdicom.association:Association._abort_blocking":
        "9174840055c5c47a12e995a38c5407231dbbe95210a4a95f8f3034033acdbac9",
    "pynetdicom.association:Association.abort":
        "4cfda7f49c6955eb3032b77cb65bce0fc247698344d6e932ab24d7ed9ae0b2e6",
    "pynetdicom.association:Association.kill":
        "c3955a9b22eb296952d7ef73129466574e5c6116c75da30b5504002c17394814",
    "pynetdicom.transport:AssociationSocket.send":
        "30954262b82648fb3991f9ed998dd7b2fa2cb1a744ad5cbf6c81a16b9da420ae",
    "pynetdicom.transport:AssociationServer._bind_defaults":
        "9958fd57e00e0d53391981b13adb3ad84220bd7df19790cff526907c83b7e66c",
    "pynetdicom.transport:AssociationServer.get_request":
        "d8a5ca12382bb621ce2a3ddf878c19bed9c611e53c51fd1005ee844ba12025b5",
    "pynetdicom.transport:AssociationServer.process_request":
        "3944b6a95ba6c9c1604e4e7d5240e7713e400b4f0418d31befd5c727fbef4cd5",
    "pynetdicom.transport:AssociationServer.server_bind":
        "693a0d3ac805f034f8e860ebe557adce856dfa68b4e3efe2eeaa8fed478dbcb3",
    "pynetdicom.transport:ThreadedAssociationServer.process_request_thread":
        "298e69cdb8be90e832a793a3216f918ec0bcbe9b1cea748054af35ad9c5aff80",
    "pynetdicom.transport:RequestHandler._create_association":
        "6e1e1aa28e55307c95291117996e46f5ea1ac9b269dcc08a01543af853a0993f",
    # relied on by store_send: the send it stands in for, and how a response is awaited
    "pynetdicom.association:Association.send_c_store":
        "5761547a43760f514150cc9e713a19b21e76a0264c7500252d406a5125129fab",
    "pynetdicom.association:Association._handle_no_response":
        "e46d0dbecf756a34f2c95e8af3081ac0b0cd26fac0da5ecbf76ab514c4f55681",
    "pynetdicom.dimse_messages:DIMSEMessage.primitive_to_message":
        "c487e174216245c8e4b9eafff71d3ec362b1961bd923d61b93fe0928286a6765",
    # dimse_cap.py: the copy of receive_primitive, and what it calls
    "pynetdicom.dimse:DIMSEServiceProvider.receive_primitive":
        "533d17b6a815edee0cf264b62db31dd54ce9b3ec4c77c466a418bce0258ab584",
    "pynetdicom.dimse_messages:DIMSEMessage.message_to_primitive":
        "95c5a14dc7d2b04b2d3848e76745f1a27821f5905ee8e797a5935231df4d557d",
}


def upstream_source(name: str) -> str:
    """The source of ``module:qualname`` as the module file has it (our patches may
    have replaced the attribute in this process, the file is untouched)."""
    module_name, _, qualname = name.partition(":")
    source = inspect.getsource(importlib.import_module(module_name))
    node: ast.AST = ast.parse(source)
    for part in qualname.split("."):
        node = next((n for n in ast.iter_child_nodes(node)
                     if isinstance(n, ast.ClassDef | ast.FunctionDef) and n.name == part), None)
        if node is None:
            return ""
    return ast.get_source_segment(source, node) or ""


def test_upstream_code_we_patch_or_rely_on_is_unchanged() -> None:
    from pipeline.dicom import dimse_cap, pdu_guard

    changed = sorted(name for name, digest in UPSTREAM_SHA256.items()
                     if hashlib.sha256(upstream_source(name).encode()).hexdigest() != digest)
    assert not changed, f"pynetdicom changed: {', '.join(changed)}"
    pinned = {name.split(":")[1] for name in UPSTREAM_SHA256}
    assert set(pdu_guard.UPSTREAM) <= pinned
    assert set(dimse_cap.UPSTREAM) <= pinned


def test_the_internals_we_rely_on_exist() -> None:
    for knob in ("STORE_RECV_CHUNKED_DATASET", "STORE_SEND_CHUNKED_DATASET", "UNRESTRICTED_STORAGE_SERVICE",
                 "LOG_HANDLER_LEVEL"):
        assert hasattr(_config, knob), knob
    assert callable(dimse_messages.create_file_meta)  # replaced by pipeline.dicom.filemeta
    assert callable(Association._serve_request)  # wrapped by pipeline.dicom.transfer
    assert callable(ThreadedAssociationServer.process_request_thread)  # pipeline.dicom.scp_server


def test_runtime_dependencies_are_the_agreed_ones() -> None:
    names = set(dependencies())
    assert {"pynetdicom", "pydicom", "watchdog", "supervisor", "loguru", "croniter"} <= names
    # no GPL codec (pylibjpeg-libjpeg is GPLv3)
    assert "pylibjpeg-libjpeg" not in names


def test_every_package_is_in_the_wheel() -> None:
    """A package left out of ``[tool.setuptools] packages`` works in the editable install
    and is missing from a wheel (pipeline.sending once was)."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(REPO).parts)
             for top in ("pipeline", "services") for init in (REPO / top).rglob("__init__.py")}
    assert found == listed
