"""The committed coordinator/dtmgpb/ modules are exactly what the documented command makes."""

from __future__ import annotations

from pathlib import Path

from coordinator.dtmgpb import dtmgimp_pb2
from coordinator.grpc_gen import PACKAGE, ROOT, generate


def test_regenerating_gives_the_committed_modules(tmp_path: Path) -> None:
    written = generate(tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["dtmgimp_pb2.py", "dtmgimp_pb2.pyi", "dtmgimp_pb2_grpc.py",
                     "dtmgimp_pb2_grpc.pyi"]
    for path in written:
        committed = ROOT / PACKAGE / path.name
        assert committed.read_bytes() == path.read_bytes(), f"{path.name} is stale"


def test_dtm_names_and_field_numbers() -> None:
    """What dtm's own clients rely on: package, service, methods, numbers."""
    service = dtmgimp_pb2.DESCRIPTOR.services_by_name["Dtm"]
    assert service.full_name == "dtmgimp.Dtm"
    assert [m.name for m in service.methods] == [
        "NewGid", "Submit", "Prepare", "Abort", "RegisterBranch", "PrepareWorkflow",
        "Subscribe", "Unsubscribe", "DeleteTopic",
    ]
    fields = {f.name: f.number for f in dtmgimp_pb2.DtmRequest.DESCRIPTOR.fields}
    assert fields == {"Gid": 1, "TransType": 2, "TransOptions": 3, "CustomedData": 4,
                      "BinPayloads": 5, "QueryPrepared": 6, "Steps": 7, "ReqExtra": 8,
                      "RollbackReason": 9}
    opts = {f.name: f.number for f in dtmgimp_pb2.DtmTransOptions.DESCRIPTOR.fields}
    assert opts == {"WaitResult": 1, "TimeoutToFail": 2, "RetryInterval": 3,
                    "BranchHeaders": 5, "RequestTimeout": 6, "RetryLimit": 7}
    branch = {f.name: f.number for f in dtmgimp_pb2.DtmBranchRequest.DESCRIPTOR.fields}
    assert branch == {"Gid": 1, "TransType": 2, "BranchID": 3, "Op": 4, "Data": 5,
                      "BusiPayload": 6}
