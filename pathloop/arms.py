"""The arms of ``pathloop experiment``: their names, and what each name means.

An arm's name is the source of its rewards, optionally followed by a method suffix and a
``-real`` suffix:

- sources: ``control`` (no feedback: the pool weighs 0, only the beta_r real term trains),
  ``feedback`` (the reward model's rewards), ``oracle`` (the expert's own verdicts),
  ``self-training`` (every pool image weight 1), ``expert-data`` (the control on the real train
  images the expert accepts: the knowledge applied to the data, a ceiling for one round),
  ``feedback-data`` (the control with the reward model weighing its real train images: the
  expert's knowledge applied to the data through the reward model, no pool);
- ``-nft``: the same rewards finetuned with negative-aware finetuning, rewards normalised within
  each class; ``-dpo``: MAGIC's preference route on the expert's checklist scores;
- ``-real``: the rewards weigh the real images of the beta_r term too (``finetune.weigh_real``):
  the reward model scores the real train images (feedback), or the expert judges them (oracle).
  With Eq. 3 an image the expert would reject is drawn less often (never, with 0/1 verdicts);
  with nft it pushes the model away.
"""

from __future__ import annotations

from typing import Literal

Arm = Literal[
    "control",
    "feedback",
    "oracle",
    "self-training",
    "feedback-nft",
    "oracle-nft",
    "oracle-dpo",
    "expert-data",
    "feedback-data",
    "feedback-real",
    "oracle-real",
    "feedback-nft-real",
    "oracle-nft-real",
]
ARMS: tuple[str, ...] = ("control", "feedback", "oracle", "self-training")
METHODS = {"-nft": "nft", "-dpo": "dpo"}  # arm suffix -> finetune.method
REAL_SUFFIX = "-real"  # the arm's rewards weigh the real images too

CONTROL = "control"
EXPERT_DATA = "expert-data"  # the control on the real train images the expert accepts
FEEDBACK_DATA = "feedback-data"  # the control, its real images drawn by the reward model
NO_POOL = (CONTROL, EXPERT_DATA, FEEDBACK_DATA)  # real images only: the pool weighs 0
BASE = "base"  # the pretrained model itself, judged on the same images: a reference row
REAL = "real"  # the real test split: the reference of PRDC and TSTR
REVIEW_SEED, POOL_SEED = 10_000, 15_000  # sampling seeds of the review set and the pool
MAX_POOL_PASSES = 4.0  # past this the arms mostly re-fit the same pool images


def weighs_real(arm: str) -> bool:
    """Whether the arm's rewards weigh the real images of the beta_r term too."""
    return arm.endswith(REAL_SUFFIX)


def arm_source(arm: str) -> tuple[str, str | None]:
    """(the arm whose rewards it uses, its finetuning method or None = the experiment's)."""
    arm = arm.removesuffix(REAL_SUFFIX)
    for suffix, method in METHODS.items():
        if arm.endswith(suffix):
            return arm.removesuffix(suffix), method
    return arm, None


def model_label(arm: str, seed: int, rnd: int = 1) -> str:
    """The label of one arm x seed's model after round ``rnd`` (its finetuning run, its
    evaluation set): ``<arm>-seed<s>`` for round 1, ``<arm>-seed<s>-round<r>`` after."""
    return f"{arm}-seed{seed}" + (f"-round{rnd}" if rnd > 1 else "")


def pool_seed(rnd: int, pool_images: int) -> int:
    """The first sampling seed of round ``rnd``'s pools: a range of its own per round."""
    return POOL_SEED + (rnd - 1) * pool_images
