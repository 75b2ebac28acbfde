"""Generate the Python code of `proto/silo/v1/silo.proto` into `server/gen/`.

    python -m silo.server.protogen          # rewrite server/gen/
    python -m silo.server.protogen --check  # exit 1 if server/gen/ is stale

grpcio-tools writes `from silo.v1 import silo_pb2` into the stub module — an import that
would collide with SILO's own `silo` package — so it is rewritten to a package-relative
import. A test runs `--check`, so the committed code always matches the contract.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto" / "silo" / "v1" / "silo.proto"
GEN = ROOT / "server" / "gen"
FILES = ("silo_pb2.py", "silo_pb2.pyi", "silo_pb2_grpc.py")


def generate(out: Path) -> None:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                          f"--grpc_python_out={tmp}", str(PROTO)])
        if rc != 0:
            raise SystemExit(f"protoc failed ({rc})")
        out.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            text = (Path(tmp) / "silo" / "v1" / name).read_text()
            text = text.replace("from silo.v1 import silo_pb2", "from . import silo_pb2")
            (out / name).write_text(text)
    (out / "__init__.py").write_text('"""Generated from proto/silo/v1/silo.proto by `python -m silo.server.protogen`."""\n')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    if not args.check:
        generate(GEN)
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [n for n in FILES if (Path(tmp) / n).read_text() != (GEN / n).read_text()]
    if stale:
        print(f"stale generated code: {', '.join(stale)}; run python -m silo.server.protogen", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
