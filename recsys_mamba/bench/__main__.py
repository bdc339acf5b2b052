"""`python -m recsys_mamba.bench SUBCOMMAND [hydra overrides]`: side-by-side benchmarks.

Each subcommand is a module `recsys_mamba/bench/<name>.py` with a Hydra `main()` whose config is
`conf/bench_<name>.yaml`.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import recsys_mamba.bench as bench_pkg


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if not m.name.startswith("_"))


def main() -> None:
    names = available()
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        given = sys.argv[1] if len(sys.argv) > 1 else "nothing"
        print(
            f"error: unknown benchmark {given!r}; usage: python -m recsys_mamba.bench "
            f"{{{'|'.join(names)}}} [key=value ...]",
            file=sys.stderr,
        )
        sys.exit(2)
    name = sys.argv.pop(1)
    importlib.import_module(f"recsys_mamba.bench.{name}").main()


if __name__ == "__main__":
    main()
