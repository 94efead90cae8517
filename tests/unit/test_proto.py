"""The committed generated modules match the .proto files, and import after a plain install."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"


def _compiled(tmp_path: Path, name: str) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "set.pb"
    # In a subprocess: grpc_tools' compiler extension bundles its own protobuf and crashes when it is
    # loaded into a process that already holds the upb runtime and gRPC (seen as a segfault here).
    run = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--descriptor_set_out={out}",
                          f"pdserve/v1/{name}.proto"], capture_output=True, text=True)
    assert run.returncode == 0, f"protoc failed on {name}.proto: {run.stderr}"
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (fd,) = [f for f in fds.file if f.name == f"pdserve/v1/{name}.proto"]
    for message in fd.message_type:  # generated modules drop the derived json_name
        for f in message.field:
            f.ClearField("json_name")
    return fd


@pytest.mark.parametrize("name", ["worker", "kv"])
def test_generated_module_matches_proto(tmp_path, name):
    import importlib

    module = importlib.import_module(f"pdserve.v1.{name}_pb2")
    committed = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
    assert committed == _compiled(tmp_path, name), (
        f"proto/pdserve/v1/{name}_pb2.py is stale: regenerate with `python -m grpc_tools.protoc -Iproto "
        "--python_out=proto --pyi_out=proto --grpc_python_out=proto proto/pdserve/v1/*.proto`"
    )


def test_services_have_the_documented_rpcs():
    from pdserve.v1 import kv_pb2, worker_pb2

    worker = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
    assert set(worker.methods_by_name) == {"Prefill", "Decode", "Generate", "Abort", "Health", "Stats", "SetRole"}
    assert worker.methods_by_name["Decode"].server_streaming
    kv = kv_pb2.DESCRIPTOR.services_by_name["KV"]
    assert set(kv.methods_by_name) == {"Handshake", "PullBlocks", "ExtendLease", "Release"}
    assert kv.methods_by_name["PullBlocks"].server_streaming
