import pytest
import torch

from mmssl.errors import ConfigError
from mmssl.nn.context import CausalTransformerContext, RecurrentContext


def _contexts():
    return {
        "gru": RecurrentContext(12, 16, num_layers=1, cell="gru"),
        "lstm": RecurrentContext(12, 16, num_layers=2, cell="lstm", residual=True),
        "transformer": CausalTransformerContext(
            12, 16, num_layers=2, num_heads=4, pos_conv_kernel=4, pos_conv_groups=4
        ),
    }


@pytest.mark.parametrize("kind", ["gru", "lstm", "transformer"])
def test_future_frames_do_not_change_past_outputs(kind):
    torch.manual_seed(0)
    net = _contexts()[kind].eval()
    x = torch.randn(2, 10, 12)
    lengths = torch.tensor([10, 10])
    y = x.clone()
    y[:, 6:] = torch.randn(2, 4, 12)
    with torch.no_grad():
        a, b = net(x, lengths), net(y, lengths)
    assert a.shape == (2, 10, 16)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)


@pytest.mark.parametrize("kind", ["gru", "lstm", "transformer"])
def test_padded_batch_equals_each_sequence_alone(kind):
    torch.manual_seed(0)
    net = _contexts()[kind].eval()
    x = torch.randn(3, 9, 12)
    lengths = torch.tensor([9, 5, 2])
    with torch.no_grad():
        out = net(x, lengths)
        for i, n in enumerate(lengths.tolist()):
            assert torch.allclose(out[i, :n], net(x[i : i + 1, :n], lengths[i : i + 1])[0], atol=1e-5)


def test_lstm_residual_adds_layer_input():
    torch.manual_seed(0)
    net = RecurrentContext(8, 8, num_layers=2, cell="lstm", residual=True).eval()
    x = torch.randn(1, 5, 8)
    first, _ = net.layers[0](x)
    second, _ = net.layers[1](first)
    assert torch.allclose(net(x, torch.tensor([5])), first + second, atol=1e-6)


def test_unknown_cell_is_a_config_error():
    with pytest.raises(ConfigError, match="rnn"):
        RecurrentContext(8, 8, cell="rnn")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=["float32_in", "bf16_in"])
def test_recurrent_layers_run_in_float32_under_bf16_autocast(cell, device, input_dtype):
    """bf16 autocast must not reach the recurrence: oneDNN has no bf16 LSTM on AVX2-only CPUs
    (training APC and DeCoAR raised there), and CUDA autocast runs cuDNN RNNs in float16. The
    layers see float32 input, whether their input comes as float32 (log mels) or as bf16 (a
    convolution under autocast), and compute what float32 computes, gradients included."""
    torch.manual_seed(0)
    net = RecurrentContext(12, 16, num_layers=2, cell=cell, residual=True).to(device).train()
    seen = []
    for layer in net.layers:
        layer.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out[0].dtype)))
    x = torch.randn(2, 9, 12, device=device).bfloat16().to(input_dtype)  # values exact in both
    lengths = torch.tensor([9, 6], device=device)
    expected = net(x.float(), lengths)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), net.layers[0].weight_ih_l0)
    seen.clear()
    with torch.autocast(device, dtype=torch.bfloat16):
        got = net(x, lengths)
    assert seen == [(torch.float32, torch.float32)] * 2
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(got.square().sum(), net.layers[0].weight_ih_l0)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-5, atol=1e-6)
