"""``python -m bench``: run every bench/<name>.py that defines ``main()``, each in its own process
(so one bench's threads, imports or crash cannot skew or stop the next), and report which failed.

A bench that scores what other commands made (evaluation folders, phantom sets) says so in a
module-level ``NEEDS_DATA`` string; it is listed as skipped with how to run it, not run without its
inputs and counted as failed."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def modules_with_main() -> dict[str, str | None]:
    """Each bench module with a ``main()``, and what data it needs (its ``NEEDS_DATA``) or None."""
    names: dict[str, str | None] = {}
    for path in sorted(HERE.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            names[path.stem] = next((node.value.value for node in tree.body if isinstance(node, ast.Assign)
                                     and any(getattr(t, "id", "") == "NEEDS_DATA" for t in node.targets)
                                     and isinstance(node.value, ast.Constant)), None)
    return names


def main() -> int:
    only = set(sys.argv[1:])
    failed = []
    for name, needs in modules_with_main().items():
        if only and name not in only:
            continue
        if needs:
            print(f"\n===== bench.{name}: skipped, it needs {needs}: python -m bench.{name} --help =====")
            continue
        print(f"\n===== bench.{name} =====", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", f"bench.{name}"], cwd=HERE.parent)
        print(f"===== bench.{name}: exit {rc} after {time.monotonic() - t0:.0f} s =====", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed benches: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
