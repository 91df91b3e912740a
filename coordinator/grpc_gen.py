"""Regenerate coordinator/dtmgpb/ from proto/dtmgimp.proto: `python -m coordinator.grpc_gen`.

The generated modules are committed, so installing the coordinator needs neither
grpcio-tools nor a build step; tests/test_grpc_gen.py regenerates into a temporary
directory and fails if the committed files differ. Needs the `dev` extra
(grpcio-tools, mypy-protobuf for the .pyi stubs).

protoc is told that proto/ is `coordinator/dtmgpb/`, so the generated gRPC module imports
its messages as `coordinator.dtmgpb.dtmgimp_pb2` instead of a top-level `dtmgimp_pb2`.
"""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "coordinator/dtmgpb"
PROTO = "dtmgimp.proto"


def generate(out_dir: Path) -> list[Path]:
    """Write the modules of PACKAGE below `out_dir`; return the files written."""
    from grpc_tools import protoc  # dev-only: installed with grpcio-tools

    plugins = []
    for name in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
        # Next to this interpreter first: a virtualenv's scripts need not be on PATH.
        path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
        if path is None:
            raise RuntimeError(f"{name} not found: pip install mypy-protobuf")
        plugins.append(f"--plugin={name}={path}")
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        *plugins,
        f"--proto_path={PACKAGE}={ROOT / 'proto'}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        f"{PACKAGE}/{PROTO}",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see its message above")
    return sorted((out_dir / PACKAGE).glob("dtmgimp_pb2*"))


def main() -> int:
    for path in generate(ROOT):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
