"""The support table: every stage (and the prune -> distill -> gptq chain) on a tiny model of every family.

    python bench/families.py        # writes bench/results/families.json and .md, and the README's table

Runs compress.support.run_matrix (what a pipeline runs for each stage: the planner's refusals, the stage, the
save and the round-trip reload) on configs/models/tiny-*.json, one CPU thread. tests/test_families.py runs the
same cells and fails when one differs from this file's record, or when the README's table is not this record's.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from compress import support  # noqa: E402

RESULTS = REPO / "bench" / "results"
MARK = ("<!-- support table: bench/families.py -->", "<!-- end of support table -->")


def readme_with(table: str) -> str:
    readme = (REPO / "README.md").read_text()
    pattern = re.escape(MARK[0]) + ".*?" + re.escape(MARK[1])
    if not re.search(pattern, readme, flags=re.S):
        raise SystemExit(f"README.md has no {MARK[0]} ... {MARK[1]} section")
    return re.sub(pattern, lambda _: f"{MARK[0]}\n{table}{MARK[1]}", readme, flags=re.S)


def main() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    torch.set_num_threads(1)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(support.CORPUS_TEXT)
        rows = support.run_matrix(str(corpus), Path(tmp) / "work")
    (RESULTS / "families.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = support.markdown(rows)
    (RESULTS / "families.md").write_text(
        "# Which stage runs on which family\n\nWritten by `python bench/families.py` "
        f"({time.time() - t0:.0f} s, tiny models of configs/models/, CPU): every cell ran the stage, saved and "
        "reloaded it, or was refused before any work with the reason given.\n\n" + table)
    (REPO / "README.md").write_text(readme_with(support.markdown(rows, grouped=True)))
    print(table)


if __name__ == "__main__":
    main()
