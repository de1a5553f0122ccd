"""Print the runtime dependencies declared in pyproject.toml, one per line (a pip requirements file).

Why: the image installs them in a layer of their own, before our wheel, so that a change to the code
rebuilds only the small layer with the wheel and leaves the large dependency layer cached.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def main(argv: list[str]) -> int:
    path = Path(argv[1] if len(argv) > 1 else "pyproject.toml")
    deps = tomllib.loads(path.read_text())["project"]["dependencies"]
    sys.stdout.write("".join(f"{d}\n" for d in deps))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
