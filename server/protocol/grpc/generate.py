"""Regenerate predict_v2_pb2.py (and its .pyi) from predict_v2.proto with grpcio-tools: the .proto is the one source
of truth, and the generated files are checked in so that the server needs no compiler. `--check` (run by the
tests) exits 1 when the checked-in files differ from what the .proto gives.

    python -m server.protocol.grpc.generate [--check]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]  # imports in the generated code are relative to the repository root
PROTO = HERE / "predict_v2.proto"
OUTPUTS = ("predict_v2_pb2.py", "predict_v2_pb2.pyi")


def generate(into: Path) -> dict[str, str]:
    """The generated files' texts, written under `into` (a folder mirroring the repository root)."""
    from grpc_tools import protoc

    relative = PROTO.relative_to(ROOT)
    code = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={into}", f"--pyi_out={into}", str(relative)])
    if code != 0:
        raise RuntimeError(f"protoc failed on {relative} (exit {code})")
    return {name: (into / relative.parent / name).read_text() for name in OUTPUTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the checked-in files, write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        texts = generate(Path(tmp))
    stale = [name for name, text in texts.items() if not (HERE / name).is_file() or (HERE / name).read_text() != text]
    if args.check:
        if stale:
            sys.exit(f"stale generated code: {', '.join(stale)}; run python -m server.protocol.grpc.generate")
        return
    for name, text in texts.items():
        (HERE / name).write_text(text)
    print(f"wrote {', '.join(OUTPUTS)}")


if __name__ == "__main__":
    main()
