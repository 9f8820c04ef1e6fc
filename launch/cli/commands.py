"""The training commands: pretrain, finetune, glue and embed (launch/pretrain.py, ..., and `bertlaunch <command>`)."""

from __future__ import annotations

from bertlaunch.cli.entry import Command, entry
from bertlaunch.core.assemble import assemble, plan_problems
from bertlaunch.core.preflight import Preflight
from bertlaunch.core.task import TaskSpec
from bertlaunch.tasks.classify.config import FinetuneConfig
from bertlaunch.tasks.classify.spec import FINETUNE
from bertlaunch.tasks.embed.config import EmbedConfig
from bertlaunch.tasks.embed.spec import EMBED
from bertlaunch.tasks.glue import run as glue_run
from bertlaunch.tasks.glue.config import GlueConfig
from bertlaunch.tasks.mlm.config import PretrainConfig
from bertlaunch.tasks.mlm.spec import PRETRAIN


def train_with(spec: TaskSpec):
    """A run of one task: assemble it, train it."""
    return lambda cfg, info: assemble(spec, cfg, info).fit()


def dry_run_with(spec: TaskSpec):
    """The same assembly with a Preflight: printed, every problem listed, nothing trained."""
    def dry_run(cfg, info) -> int:
        dry = Preflight()
        assemble(spec, cfg, info, dry)
        return dry.finish()
    return dry_run


def plans_of(spec: TaskSpec):
    return lambda cfg, world: plan_problems(spec, cfg, world)


PRETRAIN_COMMAND = Command("launch/pretrain.py", "MLM pretraining of BERT-style encoders under DeepSpeed.",
                           PretrainConfig, train_with(PRETRAIN), dry_run_with(PRETRAIN), plans_of(PRETRAIN))
FINETUNE_COMMAND = Command("launch/finetune.py", "Fine-tune a BERT-style encoder on a sentence(-pair) task.",
                           FinetuneConfig, train_with(FINETUNE), dry_run_with(FINETUNE), plans_of(FINETUNE))
EMBED_COMMAND = Command("launch/embed.py", "Train sentence embeddings on (query, positive[, negative]) rows, InfoNCE "
                        "over the global batch, retrieval scores on a BEIR folder.", EmbedConfig, train_with(EMBED),
                        dry_run_with(EMBED), plans_of(EMBED))
GLUE_COMMAND = Command("launch/glue.py", "Fine-tune and score a BERT-style encoder on the GLUE benchmark.",
                       GlueConfig, glue_run.run, glue_run.dry_run, glue_run.plan_problems)


def pretrain(argv: list[str] | None = None) -> int:
    return entry(argv, PRETRAIN_COMMAND)


def finetune(argv: list[str] | None = None) -> int:
    return entry(argv, FINETUNE_COMMAND)


def glue(argv: list[str] | None = None) -> int:
    return entry(argv, GLUE_COMMAND)


def embed(argv: list[str] | None = None) -> int:
    return entry(argv, EMBED_COMMAND)
