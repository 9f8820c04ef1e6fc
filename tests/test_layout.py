"""The dependency rules of the code layout (README, "Code layout"), checked on the source."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def imported_packages(folder: str) -> dict[str, set[str]]:
    """file -> the top-level packages it imports (anywhere in the file, lazy imports included)."""
    out = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        tops = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                tops.add(node.module.split(".")[0])
        out[str(path.relative_to(REPO))] = tops
    return out


@pytest.mark.parametrize("folder,forbidden", [("data", {"launch"}), ("model", {"launch", "data"})])
def test_data_and_model_do_not_import_what_sits_above_them(folder, forbidden):
    bad = {f: sorted(tops & forbidden) for f, tops in imported_packages(folder).items() if tops & forbidden}
    assert bad == {}


def test_one_module_reads_the_rank_variables():
    pattern = re.compile(r"[\"'](RANK|WORLD_SIZE|LOCAL_RANK|SLURM_PROCID)[\"']")
    readers = sorted(str(p.relative_to(REPO)) for folder in ("launch", "data", "model")
                     for p in (REPO / folder).rglob("*.py") if pattern.search(p.read_text()))
    assert readers == ["launch/core/dist.py"]


def test_no_source_file_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for folder in ("launch", "data", "model", "tests", "bench")
            for p in (REPO / folder).rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
