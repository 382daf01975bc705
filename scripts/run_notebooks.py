"""Execute notebooks top to bottom with nbclient, as the tests do, and time each one.

    python scripts/run_notebooks.py notebooks/01_data.ipynb --tiny       # CI settings, nothing written
    python scripts/run_notebooks.py notebooks/0*.ipynb --inplace         # full CPU run, outputs saved
    python scripts/run_notebooks.py notebooks/0*.ipynb --check           # committed outputs only

Each notebook runs in a fresh kernel whose working directory is a new temporary folder
(so run directories it makes are thrown away), with PYTHONPATH=src and the project's
offline data mirror (../shared/data) when it is there and GPTFORGE_DATA_MIRROR is unset.
`--tiny` sets GPTFORGE_NB_TINY=1 and a private download cache, as tests/test_notebooks.py
does. A notebook with an error output fails the run (exit status 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
MIRROR = ROOT.parent / "shared" / "data"


def kernel_env(tiny: bool, cache: Path | None, threads: int) -> dict[str, str]:
    """The environment of the notebook's kernel."""
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads)}
    if not env.get("GPTFORGE_DATA_MIRROR") and MIRROR.is_dir():
        env["GPTFORGE_DATA_MIRROR"] = str(MIRROR)
    if tiny:
        env["GPTFORGE_NB_TINY"] = "1"
    else:
        env.pop("GPTFORGE_NB_TINY", None)
    if cache is not None:
        env["GPTFORGE_CACHE"] = str(cache)
    return env


def problems(nb) -> list[str]:
    """Error outputs, and the absence of any output at all."""
    found, outputs = [], 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        outputs += len(cell.get("outputs", []))
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append(f"cell {i}: {out.get('ename')}: {out.get('evalue')}")
    if not outputs:
        found.append("no cell has any output")
    return found


def run(path: Path, tiny: bool, inplace: bool, timeout: int, threads: int) -> tuple[float, list[str]]:
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="nb-") as tmp:
        cache = Path(tmp) / "cache" if tiny else None
        client = NotebookClient(nb, kernel_name="python3", timeout=timeout,
                                resources={"metadata": {"path": tmp}})
        start = time.perf_counter()
        try:
            client.execute(env=kernel_env(tiny, cache, threads))
        except CellExecutionError as err:
            lines = [line for line in str(err).splitlines() if "Error" in line]
            return time.perf_counter() - start, [(lines or ["a cell failed"])[-1]]
        seconds = time.perf_counter() - start
    found = problems(nb)
    if inplace and not found:
        nbformat.write(nb, path)
    return seconds, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--tiny", action="store_true", help="GPTFORGE_NB_TINY=1, as in CI")
    parser.add_argument("--inplace", action="store_true", help="save the executed notebook")
    parser.add_argument("--check", action="store_true",
                        help="run nothing: check that the saved notebooks have outputs and no errors")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the kernel")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.notebooks:
        if args.check:
            found = problems(nbformat.read(path, as_version=4))
            print(f"{path.name}: {'ok' if not found else 'FAILED: ' + '; '.join(found)}")
            failed += bool(found)
            continue
        seconds, found = run(path, args.tiny, args.inplace, args.timeout, args.threads)
        status = "ok" if not found else "FAILED: " + "; ".join(found)
        print(f"{path.name}: {seconds:.1f} s ({'tiny' if args.tiny else 'full'}) {status}", flush=True)
        failed += bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
