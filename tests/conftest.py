"""Shared fixtures: fixed seeds and a tiny model config that builds offline in milliseconds."""

import random

import numpy as np
import pytest
import torch

from maskformer.config import Config, config_from_dict

TINY_OVERRIDES = [
    "model.backbone.name=test_resnet",
    "model.backbone.pretrained=false",
    "model.backbone.kwargs={zero_init_last: false}",
    "model.num_classes=4",
    "model.conv_dim=32",
    "model.mask_dim=32",
    "model.hidden_dim=32",
    "model.nheads=4",
    "model.dim_feedforward=64",
    "model.num_queries=8",
    "model.dec_layers=2",
    "model.pixel_decoder_enc_layers=1",
]


# A few seconds of real training on a tiny shapes split (7 classes), for trainer-level tests.
TINY_TRAINING = [
    "model.num_classes=7",
    "data.train.options={num_images: 16}",
    "data.test.options={num_images: 4}",
    "data.num_workers=0",
    "data.min_size_train=[64]",
    "data.max_size_train=128",
    "data.crop_size=[64,64]",
    "data.min_size_test=64",
    "data.max_size_test=64",
    "solver.ims_per_batch=4",
    "solver.base_lr=1e-3",
    "train.device=cpu",
    "train.log_period=1",
    "train.eval_period=0",
]


def tiny_config(*overrides: str) -> Config:
    """A ~0.5M-parameter MaskFormer config (timm's test_resnet backbone, 2 decoder layers, 8 queries)."""
    return config_from_dict({}, TINY_OVERRIDES + list(overrides))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
