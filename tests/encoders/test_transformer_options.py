"""``TransformerOptions``: one value for the transformer arguments the encoder builders share."""

import dataclasses
import inspect

import pytest
import torch

import mmssl.encoders  # noqa: F401  (registers the presets)
from mmssl.encoders.audio import build_conv_encoder, build_fbank_encoder
from mmssl.encoders.av import build_av_encoder
from mmssl.errors import ConfigError
from mmssl.nn.transformer import TransformerOptions, build_transformer
from mmssl.registry import ENCODERS


def test_fields_are_exactly_build_transformer_arguments_with_its_defaults():
    params = inspect.signature(build_transformer).parameters
    assert TransformerOptions.field_names() == tuple(params)
    defaults = TransformerOptions()
    for name, p in params.items():
        if p.default is not inspect.Parameter.empty:
            assert getattr(defaults, name) == p.default, name


def test_build_equals_build_transformer_under_the_same_seed():
    options = TransformerOptions(
        dim=16,
        num_layers=2,
        num_heads=2,
        ffn_dim=32,
        pos_conv_kernel=4,
        pos_conv_groups=2,
        rel_pos_buckets=8,
        rel_pos_max_distance=20,
    )
    torch.manual_seed(3)
    a = options.build().state_dict()
    torch.manual_seed(3)
    b = build_transformer(**dataclasses.asdict(options)).state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "position_bias.embed.weight" in a


def test_replace_names_an_unknown_field_and_leaves_the_original():
    base = TransformerOptions()
    assert base.replace(num_layers=3).num_layers == 3 and base.num_layers == 12
    with pytest.raises(ConfigError, match="'num_layer'"):
        base.replace(num_layer=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.dim = 8  # type: ignore[misc]


@pytest.mark.parametrize("builder", [build_conv_encoder, build_fbank_encoder, build_av_encoder])
def test_builders_take_one_options_value_or_its_fields_alike(builder):
    small = dict(dim=16, num_layers=1, num_heads=2, ffn_dim=32, pos_conv_kernel=4, pos_conv_groups=2)
    extra = {"conv_channels": 8} if builder is build_conv_encoder else {}
    extra.update({"lip": "tiny"} if builder is build_av_encoder else {})
    torch.manual_seed(0)
    flat = builder(**small, **extra)
    torch.manual_seed(0)
    default = inspect.signature(builder).parameters["transformer"].default
    one_value = builder(default.replace(**small), **extra)
    a, b = flat.state_dict(), one_value.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert flat.transformer.layer_drop == default.layer_drop and flat.transformer.pre_norm == default.pre_norm


@pytest.mark.parametrize("name", ["hubert_tiny", "fbank_tiny", "av_tiny"])
def test_presets_take_transformer_fields_and_reject_unknown_keys(name):
    enc = ENCODERS.build(name, num_layers=3, rel_pos_buckets=8)
    assert len(enc.transformer.layers) == 3 and enc.transformer.position_bias.num_buckets == 8
    with pytest.raises(ConfigError, match=f"{name}.*'num_layer'"):
        ENCODERS.build(name, num_layer=3)
    with pytest.raises(ConfigError, match="'transformer'"):
        ENCODERS.build(name, transformer=TransformerOptions())
