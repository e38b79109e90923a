"""The model zoo: every kind builds and runs forward; bad specs name the field at fault."""

from __future__ import annotations

import pytest
import torch

from workers.training.kfac import KFACPreconditioner
from workers.training.models import build_model

SPECS = {
    "mlp": ({"kind": "mlp", "sizes": [64, 32, 10], "activation": "tanh"}, (5, 64), (5, 10)),
    "cnn": ({"kind": "cnn", "image_size": 8, "channels": [8, 16], "classes": 10}, (5, 64),
            (5, 10)),
    "autoencoder": ({"kind": "autoencoder", "input_dim": 64, "hidden": [32, 16],
                     "bottleneck": 4}, (5, 64), (5, 64)),
}


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_model_builds_and_forwards(kind):
    spec, input_shape, output_shape = SPECS[kind]
    model = build_model(spec)
    assert model(torch.randn(*input_shape)).shape == output_shape


def test_transformer_builds_and_forwards_causally():
    spec = {"kind": "transformer", "vocab": 17, "context": 8, "width": 16, "layers": 2,
            "heads": 4}
    model = build_model(spec).eval()
    tokens = torch.randint(0, 17, (3, 8))
    logits = model(tokens)
    assert logits.shape == (3, 8, 17)
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 17
    # causal: changing the last token leaves the earlier positions' logits alone
    torch.testing.assert_close(model(changed)[:, :-1], logits[:, :-1])


def test_autoencoder_has_a_linear_code_layer_and_mirrored_sizes():
    model = build_model({"kind": "autoencoder", "input_dim": 64, "hidden": [32],
                         "bottleneck": 4})
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 4), (4, 32),
                                                                   (32, 64)]
    assert isinstance(model[2], torch.nn.Linear)  # no activation after the code layer


@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
def test_kfac_covers_every_weight_layer_of_the_zoo(kind):
    spec = SPECS.get(kind, ({"kind": "transformer", "vocab": 11, "context": 4, "width": 8,
                              "layers": 1, "heads": 2},))[0]
    model = build_model(spec)
    kfac = KFACPreconditioner(model)
    expected = sum(isinstance(m, torch.nn.Linear | torch.nn.Conv2d) for m in model.modules())
    assert len(kfac.blocks) == expected


@pytest.mark.parametrize(("spec", "field"), [
    ({"kind": "resnet"}, "model.kind"),
    ({"kind": "mlp"}, "mlp.sizes"),
    ({"kind": "mlp", "sizes": [64]}, "mlp.sizes"),
    ({"kind": "mlp", "sizes": [64, -3]}, r"mlp.sizes\[1\]"),
    ({"kind": "mlp", "sizes": [64, 10], "activation": "swish"}, "mlp.activation"),
    ({"kind": "mlp", "sizes": [64, 10], "dropout": 0.1}, "dropout"),
    ({"kind": "mlp", "sizes": [8192, 8192, 8192]}, "parameters"),
    ({"kind": "cnn", "image_size": 8}, "cnn.classes"),
    ({"kind": "autoencoder", "input_dim": "64"}, "autoencoder.input_dim"),
    ({"kind": "transformer", "vocab": 10, "context": 8, "width": 10, "layers": 1,
      "heads": 3}, "transformer.heads"),
    ({"kind": "transformer", "vocab": 10, "context": 8, "width": 8, "layers": 1, "heads": 2,
      "dropout": 1.5}, "transformer.dropout"),
    ("mlp", "dict"),
])
def test_bad_spec_is_a_value_error_naming_the_field(spec, field):
    with pytest.raises(ValueError, match=field):
        build_model(spec)
