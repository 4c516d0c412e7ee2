"""The unshared layer: LocallyConnected2d."""

import torch

from weightshare.layers import LocallyConnected2d


def test_locally_connected_with_equal_kernels_is_the_convolution():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    local = LocallyConnected2d(3, 5, (6, 7), 3, padding=1)
    with torch.no_grad():
        local.weight.copy_(conv.weight.reshape(5, -1).expand_as(local.weight))  # the same kernel at every position
        local.bias.copy_(conv.bias[:, None].expand_as(local.bias))
    x = torch.randn(2, 3, 6, 7)
    assert torch.allclose(local(x), conv(x), atol=1e-5)
    assert local.weight.numel() == 42 * conv.weight.numel()  # 6x7 positions, no sharing
