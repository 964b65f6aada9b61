from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from gpu_trainer.errors import TrainerError
from gpu_trainer.metrics import confusion_matrix, macro_f1
from gpu_trainer.models import build_model, flops_per_sample, image_shape


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_models_map_features_to_class_logits(name):
    model = build_model(name, 64, 10, 32)
    model.standardize.fit(torch.rand(50, 64) * 16)
    assert model(torch.rand(7, 64)).shape == (7, 10)
    assert flops_per_sample(model, 64) > 0


def test_image_shape():
    assert image_shape(64) == (1, 8, 8)
    assert image_shape(3 * 32 * 32) == (3, 32, 32)
    with pytest.raises(TrainerError, match="--model cnn needs image-shaped features"):
        image_shape(10)


def test_mlp_flops_count_linear_layers():
    model = build_model("mlp", 4, 3, 8)
    assert flops_per_sample(model, 4) == 2 * (4 * 8 + 8 * 8 + 8 * 3)


def test_macro_f1_matches_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 200)
    preds = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 6, 200))
    cm = confusion_matrix(torch.from_numpy(labels), torch.from_numpy(preds), 6)
    assert cm.sum() == 200
    assert macro_f1(cm) == pytest.approx(f1_score(labels, preds, average="macro"))
