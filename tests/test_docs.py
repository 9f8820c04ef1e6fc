"""The promises of the docs, checked: every shipped config passes its dry run (data paths pointed at ../shared or at
generated files), and docs/config.md is what the config dataclasses generate."""

from __future__ import annotations

import pytest
import yaml

from bertlaunch.tools.config_reference import OUT, render
from tests.helpers import REPO, needs_shared

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


def entry_of(name: str) -> str:
    data = yaml.safe_load((REPO / "configs" / name).read_text())
    if "glue" in data:
        return "glue"
    if "task" in data:  # the embedding task's rows are (query, positive); fine-tuning's (text_a[, text_b], label)
        return "embed" if "positive" in data["task"] else "finetune"
    return "pretrain"


def stand_ins(name: str, tmp_path) -> list[str]:
    """Overrides that point a config whose data is not in ../shared (the web-scale recipes) at a generated corpus,
    or a fine-tuning that starts from another run's output at the packaged model."""
    if name in ("bert_base.yaml", "bert_large_phases.yaml", "modernbert_base.yaml"):
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("a river of stone and light\n\nthe garden window and the paper house\n" * 3000)
        return [f"data.train_files=[{corpus}]", "data.num_workers=1"]
    if name == "pipeline_finetune.yaml":
        return ["model.pretrained=minilm"]  # the pipeline's pretraining output does not exist here
    if name == "embed_minilm.yaml":  # its data is made by the command in its header
        from bertlaunch.tools import pair_retrieval

        mrpc = REPO.parent / "shared" / "data" / "mrpc"
        assert pair_retrieval.main([str(tmp_path / "pairs"), "--train", str(mrpc / "train.tsv"),
                                    "--eval", str(mrpc / "test.tsv")]) == 0
        return [f"task.train_file={tmp_path / 'pairs' / 'train.jsonl'}", f"task.eval_dir={tmp_path / 'pairs' / 'beir'}"]
    return []


@needs_shared
@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_passes_its_dry_run(name, tmp_path, inproc):
    r = inproc(entry_of(name), REPO / "configs" / name,
               ["--dry-run", f"output_dir={tmp_path / 'out'}", *stand_ins(name, tmp_path)], check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "dry run OK: nothing was trained" in r.stdout


def test_the_key_reference_is_not_stale():
    assert OUT.read_text() == render(), "docs/config.md is stale: python -m bertlaunch.tools.config_reference"
