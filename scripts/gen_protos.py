"""Generate the Python modules (and .pyi stubs) for everything in protos/.

    python scripts/gen_protos.py          # write splitserve_pb/*_pb2*.py(i)
    python scripts/gen_protos.py --check  # exit 1 when the committed code drifts

The .proto files are the source of truth. Code is generated with the pinned
grpcio-tools (whose protoc matches the oldest protobuf runtime we support), so
the generated modules load on every protobuf the package allows.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.metadata
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = "splitserve_pb"
PINNED_GRPCIO_TOOLS = "1.81.1"
INIT = '"""Code generated from protos/ by scripts/gen_protos.py. Do not edit."""\n'


def generate(out_dir: Path) -> list[Path]:
    protos = sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out_dir / PACKAGE / "__init__.py").write_text(INIT)
    return sorted(p.relative_to(out_dir) for p in (out_dir / PACKAGE).glob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when generated code differs from protos/")
    args = parser.parse_args()
    tools = importlib.metadata.version("grpcio-tools")
    if tools != PINNED_GRPCIO_TOOLS:
        print(f"grpcio-tools {tools} installed; generated code is pinned to {PINNED_GRPCIO_TOOLS}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        target = ROOT / PACKAGE
        if args.check:
            committed = sorted(
                p.relative_to(ROOT) for p in target.glob("*") if p.is_file() and p.suffix in (".py", ".pyi")
            )
            drift = set(fresh) ^ set(committed)
            drift |= {p for p in set(fresh) & set(committed) if not filecmp.cmp(Path(tmp) / p, ROOT / p, shallow=False)}
            if drift:
                print("generated code drifts from protos/; run python scripts/gen_protos.py:", file=sys.stderr)
                for p in sorted(drift):
                    print(f"  {p}", file=sys.stderr)
                return 1
            print(f"{PACKAGE}: {len(fresh)} generated files match protos/")
            return 0
        if target.exists():
            for p in target.glob("*_pb2*"):
                p.unlink()
        target.mkdir(exist_ok=True)
        for rel in fresh:
            shutil.copyfile(Path(tmp) / rel, ROOT / rel)
        print(f"wrote {len(fresh)} files to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
