"""Generate the betterproto2 code from protos/, and tell whether the committed code is stale.

`make proto` runs `python -m devtools.protogen`; a test runs `stale_files`.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos"
GENERATED_DIR = ROOT / "services" / "chatlib" / "proto"


def generate(proto_dir: Path, out_dir: Path) -> None:
    protos = sorted(str(p) for p in proto_dir.rglob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    # protoc finds the plugin on PATH; put our interpreter's bin folder first.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}",
         f"--python_betterproto2_out={out_dir}",
         # Descriptors let the rpc service offer gRPC reflection from these same classes;
         # the service is served by grpc.aio (services/rpc), so no client stub is needed.
         "--python_betterproto2_opt=google_protobuf_descriptors,client_generation=none",
         *protos],
        check=True, env=env, capture_output=True,
    )  # fmt: skip


def _files(folder: Path) -> set[str]:
    return {
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def stale_files(proto_dir: Path = PROTO_DIR, committed: Path = GENERATED_DIR) -> list[str]:
    """Files that differ between the committed code and a fresh generation (empty: fresh)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(proto_dir, fresh)
        names = _files(fresh) | _files(committed)
        return sorted(
            name
            for name in names
            if not (fresh / name).exists()
            or not (committed / name).exists()
            or not filecmp.cmp(fresh / name, committed / name, shallow=False)
        )


def main() -> None:
    if GENERATED_DIR.exists():
        shutil.rmtree(GENERATED_DIR)
    generate(PROTO_DIR, GENERATED_DIR)
    print(f"generated {len(_files(GENERATED_DIR))} files in {GENERATED_DIR.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
