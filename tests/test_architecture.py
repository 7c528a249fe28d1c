"""The model definition follows the checkpoint's `architectures`, as vLLM's does, not
its `model_type` (which mlx-lm would follow)."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from mlx_lm.utils import load_model as mlx_lm_load_model

from vllm_metal.models.loader import load_model

PROMPT = [[5, 17, 33, 90, 12]]


def test_model_type_pointing_elsewhere_loads_the_architecture(tiny_model, tmp_path):
    original = Path(tiny_model("qwen3"))
    relabelled = tmp_path / "relabelled"
    shutil.copytree(original, relabelled)
    config = json.loads((relabelled / "config.json").read_text())
    config["model_type"] = "qwen2"  # architectures stays Qwen3ForCausalLM
    (relabelled / "config.json").write_text(json.dumps(config))

    model = load_model(str(relabelled), torch.float32)
    reference, _ = mlx_lm_load_model(original)
    assert type(model).__module__ == "mlx_lm.models.qwen3"
    tokens = mx.array(PROMPT)
    np.testing.assert_allclose(np.array(model(tokens)), np.array(reference(tokens)), atol=1e-5)
