"Package-level tests of pmal.models: parameter counts, shapes, the (z, logits) contract, the registry."
import pytest
import torch
from torch import nn

from pmal.models import (MODELS, EmbeddingClassifier, classifier32, create_model, default_backbone, digits_net,
                         resnet50, wrn40_4)

torch.set_num_threads(1)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# (name, input shape used for the shape test, embed dim)
CASES = [('classifier32', (3, 32, 32), 128), ('wrn40_4', (3, 32, 32), 256),
         ('resnet50', (3, 32, 32), 2048), ('digits_net', (1, 8, 8), 64)]


def test_classifier32_exact_count():
    m = classifier32(6)
    assert n_params(m.features) == 999_104           # the paper's "< 1M" backbone
    assert n_params(m) == 999_104 + 6 * 128
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 128, 1), (128, 128, 2),
        (128, 128, 1), (128, 128, 1), (128, 128, 2)]
    assert all(c.bias is None and c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(l, nn.Dropout2d) for l in m.modules()) == 3
    assert all(l.negative_slope == 0.2 for l in m.modules() if isinstance(l, nn.LeakyReLU))


def test_classifier32_init():
    torch.manual_seed(0)
    m = classifier32(10)
    w = torch.cat([l.weight.flatten() for l in m.modules() if isinstance(l, nn.Conv2d)])
    assert abs(w.std().item() - 0.05) < 0.002 and abs(w.mean().item()) < 0.002
    bn = [l for l in m.modules() if isinstance(l, nn.BatchNorm2d)]
    g = torch.cat([b.weight for b in bn])
    assert abs(g.mean().item() - 1) < 0.01 and 0.01 < g.std().item() < 0.03
    assert all((b.bias == 0).all() for b in bn)


def test_wrn40_4_count():
    m = wrn40_4(10)
    assert n_params(m.features) == 8_946_640
    assert 8.9e6 < n_params(m) < 8.96e6                # the paper's "WRN 9M" (WRN-40-4 has 8.9M)
    blocks = [l for l in m.modules() if type(l).__name__ == 'WideBasic']
    assert len(blocks) == 18                             # 3 groups of (40 - 4) / 6


def test_resnet50_count():
    m = resnet50(100)
    assert n_params(m.features) == 23_508_032            # torchvision ResNet-50 without fc
    assert m.head.weight.shape == (100, 2048)


@pytest.mark.parametrize('name,shape,dim', CASES)
def test_forward_contract(name, shape, dim):
    torch.manual_seed(0)
    m = create_model(name, 7, shape[0])
    assert isinstance(m, EmbeddingClassifier) and m.embed_dim == dim
    assert isinstance(m.head, nn.Linear) and m.head.weight.shape == (7, dim) and m.head.bias is None
    x = torch.randn(3, *shape)
    m.eval()
    with torch.no_grad():
        z, logits = m(x)
    assert z.shape == (3, dim) and logits.shape == (3, 7)
    torch.testing.assert_close(logits, m.head(z), rtol=0, atol=0)
    # train mode (dropout, batch statistics): logits still come from z through the head
    m.train()
    z, logits = m(x)
    torch.testing.assert_close(logits, m.head(z), rtol=0, atol=0)
    logits.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize('name', ['classifier32', 'wrn40_4', 'resnet50'])
def test_in_channels(name):
    m = create_model(name, 4, in_channels=1).eval()
    with torch.no_grad():
        z, logits = m(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 4)


def test_digits_net_has_dropout_and_bn():
    m = digits_net(6)
    assert any(isinstance(l, (nn.Dropout, nn.Dropout2d)) for l in m.modules())
    assert any(isinstance(l, nn.BatchNorm2d) for l in m.modules())
    assert 64 <= m.embed_dim <= 128
    # dropout is stochastic in train mode, off in eval mode
    x = torch.randn(4, 1, 8, 8)
    m.train()
    assert not torch.equal(m(x)[0], m(x)[0])
    m.eval()
    assert torch.equal(m(x)[0], m(x)[0])


def test_registry_errors():
    with pytest.raises(ValueError, match='valid names: classifier32, classifier32_small, digits_net, resnet50, wrn40_4'):
        create_model('vgg16', 10)
    with pytest.raises(ValueError, match='num_classes'):
        create_model('digits_net', 0, 1)
    with pytest.raises(ValueError, match='in_channels'):
        create_model('digits_net', 3, 1.5)
    assert set(MODELS) == {'classifier32', 'classifier32_small', 'wrn40_4', 'resnet50', 'digits_net'}


def test_default_backbone():
    assert default_backbone((1, 8, 8)) == 'digits_net'
    assert default_backbone((1, 28, 28)) == 'classifier32'
    assert default_backbone((3, 64, 64)) == 'classifier32'
    assert default_backbone((3, 224, 224)) == 'resnet50'
    assert default_backbone(torch.Size([3, 96, 96])) == 'resnet50'
    with pytest.raises(ValueError, match=r'\(C, H, W\)'):
        default_backbone((32, 32))
