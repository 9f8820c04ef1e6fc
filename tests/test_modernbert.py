"""ModernBERT and the other encoder families (issue 23): presets, the masked-position head of each family and the
dense fallback, document isolation in packed blocks (model and data), ModernBERT's pad-free fine-tuning, RoPE bases,
batch-size warmup as phases, and the errors for what a model cannot do."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForMaskedLM

from bertlaunch.core import configlib
from bertlaunch.core.config import ModelConfig
from bertlaunch.core.plan import make_plan
from bertlaunch.data.corpus.reader import file_sizes
from bertlaunch.data.mlm.batches import MLMDataset, MLMSettings, compact, from_wire, initial_states
from bertlaunch.model.build import check_positions, load_mlm, refresh_rope, set_rope_bases
from bertlaunch.model.classify import Classifier, load_classifier
from bertlaunch.model.mlm import MaskedLM
from bertlaunch.model.packed import check_isolation, isolated_inputs, use_varlen
from bertlaunch.model.unpadded import check_unpadded
from bertlaunch.tasks.mlm.config import PretrainConfig
from tests.families import family_config, family_folder
from tests.helpers import make_corpus, read_metrics, write_glue

FAMILIES = ["bert", "roberta", "modernbert", "deberta-v2", "electra"]
ISOLATING = ["bert", "roberta", "modernbert", "electra"]


class Spec:
    vocab_size, pad_id, cls_id, sep_id = 30522, 0, 101, 102


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: family_folder(root, f) for f in FAMILIES}


def masked(ids: torch.Tensor, seed: int = 0):
    """30% of the positions labelled: (dense labels [B, L], flat rows, their targets padded with -100 rows)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    rows = torch.nonzero(labels.view(-1) != -100).squeeze(1)
    pad = torch.zeros(5, dtype=torch.long)
    return labels, torch.cat([rows, pad]), torch.cat([labels.view(-1)[rows], pad - 100])


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_position_head_and_dense_fallback_equal_the_models_own_loss(folders, family):
    hf, _ = load_mlm(ModelConfig(pretrained=str(folders[family])), Spec, str(folders[family]))
    sparse, dense = MaskedLM(hf.eval(), sparse_head=True), MaskedLM(hf, sparse_head=False)
    assert sparse.sparse  # a head it knows for every family here (ModernBERT: head + decoder)
    ids = torch.randint(1000, 30000, (2, 40))
    labels, rows, targets = masked(ids)
    with torch.no_grad():
        own = hf(input_ids=ids, labels=labels).loss
        # the dataloader's sparse labels only, as pretraining feeds them (the dense fallback got labels=None)
        torch.testing.assert_close(sparse(ids, mlm_rows=rows, mlm_targets=targets), own, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dense(ids, mlm_rows=rows, mlm_targets=targets), own, rtol=1e-5, atol=1e-6)


def test_a_model_without_a_masked_lm_head_is_a_clear_error(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="a gpt2 model .* has no masked-language-model head in transformers"):
        load_mlm(ModelConfig(pretrained=str(tmp_path)), Spec, str(tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_pretrains_exports_and_finetunes(folders, family, tiny_config, corpus, pairs, inproc, tmp_path):
    isolate = family in ISOLATING
    cfg = tiny_config("pretrain", {"model.preset": None, "model.pretrained": folders[family], "train.max_steps": 2,
                                   "data.train_files": [corpus(60)], "data.num_workers": 0, "checkpoint.every": 0,
                                   "data.isolate_documents": isolate})
    inproc("pretrain", cfg)
    final = tmp_path / "out" / "final"
    assert type(AutoModelForMaskedLM.from_pretrained(final)).__name__ == type(
        AutoModelForMaskedLM.from_config(family_config(family))).__name__
    train = pairs("train.tsv", 16)
    ft = tiny_config("finetune", {"model.preset": None, "model.pretrained": final, "task.train_file": train,
                                  "task.eval_file": train, "train.epochs": 1, "output_dir": tmp_path / "ft",
                                  "task.unpad": family == "modernbert"}, name="ft.yaml")
    inproc("finetune", ft)
    assert "eval_accuracy" in read_metrics(tmp_path / "ft")[-1]
    if family == "modernbert":  # and the GLUE suite, on the same export
        glue = tiny_config("glue", {"model.preset": None, "model.pretrained": final, "output_dir": tmp_path / "glue",
                                    "glue.data_dir": write_glue(tmp_path / "glue_data", ["RTE"], 16, 8, 4),
                                    "train.epochs": 1}, name="glue.yaml")
        inproc("glue", glue)
        results = json.loads((tmp_path / "glue" / "glue_results.json").read_text())
        assert results["complete"] and results["tasks"]["RTE"]["failed"] == {}


def layout(lengths: list[list[int]]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """doc_starts (flat, every row's 0 included) and the (start, end) spans of rows of these document lengths."""
    starts, spans, width = [], [], sum(lengths[0])
    for r, row in enumerate(lengths):
        at = r * width
        for n in row:
            starts.append(at)
            spans.append((at, at + n))
            at += n
    return torch.tensor(starts), spans


@pytest.mark.parametrize("family", ["modernbert", "bert", "roberta"])
def test_isolated_documents_see_only_themselves(folders, family):
    hf, _ = load_mlm(ModelConfig(pretrained=str(folders[family])), Spec, str(folders[family]))
    model = MaskedLM(hf.eval())
    lengths = [[9, 40, 15], [64]]  # 40 and 64 tokens: longer than ModernBERT's local window here (16)
    starts, spans = layout(lengths)
    ids = torch.randint(1000, 30000, (2, 64))
    labels, rows, targets = masked(ids, seed=1)
    with torch.no_grad():
        loss = model(ids, mlm_rows=rows, mlm_targets=targets, doc_starts=starts, max_doc_len=64)
        # the same loss as each document run alone (positions from 0, no neighbour)
        total, count = 0.0, 0
        flat, flat_labels = ids.view(-1), labels.view(-1)
        for a, b in spans:
            logits = hf(input_ids=flat[a:b][None]).logits[0]
            total += F.cross_entropy(logits, flat_labels[a:b], reduction="sum", ignore_index=-100)
            count += int((flat_labels[a:b] != -100).sum())
        torch.testing.assert_close(loss, total / count, rtol=1e-5, atol=1e-6)
        # changing one document leaves the other documents' logits as they were
        hidden = hf.base_model(**isolated_inputs(hf, ids, starts, 64)).last_hidden_state.view(128, -1)
        changed = ids.clone()
        changed[0, 9:49] = torch.randint(1000, 30000, (40,))
        after = hf.base_model(**isolated_inputs(hf, changed, starts, 64)).last_hidden_state.view(128, -1)
        keep = torch.ones(128, dtype=torch.bool)
        keep[9:49] = False
        torch.testing.assert_close(after[keep], hidden[keep], rtol=0, atol=1e-6)
        assert not torch.allclose(after[~keep], hidden[~keep])


@pytest.mark.parametrize("family", ["modernbert", "bert"])
def test_varlen_path_equals_the_mask_path(folders, family):
    """The GPU's path (one [1, B*L] row + boundaries, model/packed.py) run on the CPU: its padded fallback."""
    hf, _ = load_mlm(ModelConfig(pretrained=str(folders[family])), Spec, str(folders[family]))
    use_varlen(hf.eval())
    starts, _ = layout([[9, 40, 15], [64]])
    ids = torch.randint(1000, 30000, (2, 64))
    with torch.no_grad():
        mask = hf.base_model(**isolated_inputs(hf, ids, starts, 64)).last_hidden_state.view(128, -1)
        flat = hf.base_model(**isolated_inputs(hf, ids, starts, 64, varlen=True)).last_hidden_state.view(128, -1)
    torch.testing.assert_close(flat, mask, rtol=1e-5, atol=1e-6)


def test_isolation_and_rope_errors_name_the_key(folders):
    with pytest.raises(ValueError, match="data.isolate_documents=true: a deberta-v2 model cannot take per-document"):
        check_isolation(family_config("deberta-v2"))
    with pytest.raises(ValueError, match="model.rope_theta: a bert model has no rotary position embedding"):
        load_mlm(ModelConfig(pretrained=str(folders["bert"]), rope_theta=160000.0), Spec, str(folders["bert"]))
    with pytest.raises(ValueError, match=r"data.block_size=256 exceeds the model's max_position_embeddings=128: "
                                         r"lower data.block_size$"):
        check_positions(family_config("bert"), 256, "data.block_size")
    problems = PretrainConfig(output_dir="x", model=ModelConfig(preset="modernbert-bse")).validate()
    assert "model.preset 'modernbert-bse' is not a preset: did you mean 'modernbert-base'?" in " ".join(problems)
    problems = PretrainConfig(output_dir="x", model=ModelConfig(preset="bert-base", rope_theta=1e4)).validate()
    assert any("preset bert-base is a BERT with learned absolute positions, not RoPE" in p for p in problems)


def test_a_phase_rope_base_gives_the_model_built_with_it(folders):
    hf, config = load_mlm(ModelConfig(pretrained=str(folders["modernbert"]), rope_theta=10000.0), Spec,
                          str(folders["modernbert"]))
    assert config.rope_parameters["full_attention"]["rope_theta"] == 10000.0
    assert set_rope_bases(config, 160000.0, None, "train.phases[1].rope_theta")
    refresh_rope(hf)
    fresh, _ = load_mlm(ModelConfig(pretrained=str(folders["modernbert"]), rope_theta=160000.0), Spec,
                        str(folders["modernbert"]))
    ids = torch.randint(1000, 30000, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, fresh.eval()(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_modernbert_pad_free_equals_padded(pooling):
    torch.manual_seed(0)
    hf, _ = load_classifier(ModelConfig(preset="modernbert-tiny"), None, 3, None, False, 1000, 0)
    hf.config.classifier_pooling = pooling
    check_unpadded(hf)  # sets the varlen attention
    model = Classifier(hf, regression=False).eval()
    lengths = [5, 150, 33]  # 150 > the local window (128)
    seqs = [torch.randint(5, 1000, (n,)) for n in lengths]
    ids, attn = torch.zeros(3, 150, dtype=torch.long), torch.zeros(3, 150, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], attn[i, :len(s)] = s, 1
    labels = torch.tensor([0, 2, 1])
    padded = model(ids, attn, labels=labels)
    padded.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    packed = model(torch.cat(seqs), token_type_ids=torch.zeros(188, dtype=torch.long), labels=labels,
                   position_ids=torch.cat([torch.arange(n) for n in lengths]), offsets=torch.tensor([0, 5, 155, 188]),
                   max_len=150)
    packed.backward()
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_document_starts_ride_with_the_same_blocks_and_masks(tmp_path, spec):
    files = [str(make_corpus(tmp_path / "c.txt", 80))]

    def batches(isolate: bool):
        s = MLMSettings(block_size=64, micro_batch_size=4, mlm_probability=0.15, whole_word_masking=False, seed=1,
                        isolate_documents=isolate)
        ds = MLMDataset(files, file_sizes(files), spec, s, initial_states(0, 1, 1), finite=True)
        return list(ds)

    plain, isolated = batches(False), batches(True)
    assert len(plain) == len(isolated) > 3
    for a, b in zip(plain, isolated):  # data order and masks as without isolation
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    for b in isolated:
        original = torch.where(b["labels"] != -100, b["labels"], b["input_ids"]).view(-1)
        rows, length = b["input_ids"].shape
        expected = set(torch.nonzero(original == spec.cls_id).squeeze(1).tolist()) | {r * length for r in range(rows)}
        lengths = b["attention_mask"].sum(1).tolist()
        expected |= {r * length + n for r, n in enumerate(lengths) if n < length}  # pads: a sequence of their own
        assert b["doc_starts"].tolist() == sorted(expected)
        wire = from_wire(*compact(b)["wire"], b["meta"])
        assert torch.equal(wire["doc_starts"], b["doc_starts"])
    assert any(len(b["doc_starts"]) > b["input_ids"].shape[0] + 1 for b in isolated)


def test_batch_warmup_is_phases_of_growing_batch():
    cfg = configlib.load(PretrainConfig, None, [
        "output_dir=x", "model.preset=modernbert-tiny", "data.train_files=[embedded:pydoc]",
        "train.global_batch_size=64", "train.max_tokens=1e6", "data.block_size=128",
        "train.batch_warmup.tokens=300000", "train.batch_warmup.start=16", "train.batch_warmup.stages=3",
        "train.batch_warmup.multiple_of=8", "train.warmup_tokens=200000"])
    plan, problems = make_plan(cfg, 2, phases=cfg.phase_specs(), warmup_tokens=cfg.train.warmup_tokens)
    assert problems == []
    assert [(ph.global_batch, ph.end - ph.start) for ph in plan.phases] == [(16, 49), (32, 25), (48, 17), (64, 86)]
    assert plan.warmup_steps == 49 + 25  # token slots counted through the stages' batch sizes
    bad = PretrainConfig(output_dir="x", model=ModelConfig(preset="tiny"))
    bad.train.batch_warmup.tokens, bad.train.batch_warmup.start = 10, 16
    assert any("train.batch_warmup.start must be >= 1 and below the first phase's global batch size" in p
               for p in bad.validate())
