import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

import fgkeras.serving.protos as protos

PROTO = "fgkeras/serving/protos/inventory.proto"
GENERATED = ("inventory_pb2.py", "inventory_pb2_grpc.py")


def test_generated_inventory_modules_are_current(tmp_path):
    """Regenerates the modules from inventory.proto with grpc_tools and compares them byte for byte.

    protoc runs in a subprocess: grpc_tools' bundled protobuf crashes a process that loaded TensorFlow.
    """
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is needed to regenerate the protos (pip install grpcio-tools)")
    repo = pathlib.Path(protos.__file__).resolve().parents[3]
    assert (repo / PROTO).is_file()
    result = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{repo}", f"--python_out={tmp_path}",
                             f"--grpc_python_out={tmp_path}", str(repo / PROTO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in GENERATED:
        fresh = (tmp_path / os.path.dirname(PROTO) / name).read_text()
        checked_in = (repo / os.path.dirname(PROTO) / name).read_text()
        assert fresh == checked_in, (
            f"{name} is stale: regenerate with `python -m grpc_tools.protoc -I. --python_out=. "
            f"--grpc_python_out=. {PROTO}` from the repository root")


def test_generated_modules_define_the_service():
    from fgkeras.serving.protos import inventory_pb2, inventory_pb2_grpc

    service = inventory_pb2.DESCRIPTOR.services_by_name["InventoryService"]
    assert service.full_name == "fgkeras.serving.InventoryService"
    assert sorted(m.name for m in service.methods) == ["Count", "Delete", "Upsert"]
    assert hasattr(inventory_pb2_grpc, "InventoryServiceStub")
