import math
import os
import re

import numpy as np
import pytest
import torch

from model import UNet, ZERO_GAIN

# a copy of shared/seed/ckpt_keys.txt, so that a clone tests against it on its own
SEED_KEYS = os.path.join(os.path.dirname(__file__), "data", "seed_ckpt_keys.txt")
CIFAR10 = dict(T=1000, ch=128, ch_mult=[1, 2, 2, 2], attn=[1], num_res_blocks=2, dropout=0.1)
# the UNet keyword arguments of a tiny network (not main.py flags: those are conftest.TINY_ARGS)
TINY_UNET = dict(T=100, ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1, dropout=0.1)


@pytest.fixture(scope="module")
def cifar_unet():
    torch.manual_seed(0)
    return UNet(**CIFAR10)


def seed_keys():
    """(name, shape) pairs of the seed port's checkpoint, read from the listing."""
    rows = []
    for line in open(SEED_KEYS):
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split(" ", 1)
        rows.append((name, tuple(int(d) for d in shape.strip("()\n").split(",") if d.strip())))
    return rows


def test_cifar10_parameter_count(cifar_unet):
    trainable = sum(p.numel() for p in cifar_unet.parameters() if p.requires_grad)
    frozen = [p for p in cifar_unet.parameters() if not p.requires_grad]
    assert trainable == 35_746_307  # the paper's 35.7M
    assert [tuple(p.shape) for p in frozen] == [(1000, 128)]


def test_state_dict_matches_the_seed_checkpoint_layout(cifar_unet):
    ours = [(k, tuple(v.shape)) for k, v in cifar_unet.state_dict().items()]
    assert ours == seed_keys()


def test_seed_checkpoint_loads_strictly_and_keeps_its_embedding_table(cifar_unet):
    generator = torch.Generator().manual_seed(1)
    foreign = {name: torch.randn(shape, generator=generator) for name, shape in seed_keys()}
    model = UNet(**CIFAR10)
    model.load_state_dict(foreign, strict=True)
    table = foreign["time_embedding.timembedding.0.weight"]
    t = torch.tensor([0, 17, 999])
    assert torch.equal(model.time_embedding.timembedding[0](t), table[t])


def test_timestep_embedding_is_the_official_sinusoid(cifar_unet):
    table = cifar_unet.time_embedding.timembedding[0].weight.double().numpy()
    half = 64
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / (half - 1))
    t = np.arange(1000)[:, None]
    expected = np.concatenate([np.sin(t * freqs), np.cos(t * freqs)], axis=1)
    np.testing.assert_allclose(table, expected, atol=1e-6)


def test_output_shape_and_eval_determinism(cifar_unet):
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([3, 900])
    cifar_unet.eval()
    with torch.no_grad():
        first, second = cifar_unet(x, t), cifar_unet(x, t)
    assert first.shape == x.shape
    assert torch.equal(first, second)


def test_dropout_is_active_in_train_mode():
    torch.manual_seed(0)
    model = UNet(**TINY_UNET).train()
    # Move the zero-initialised layers off zero so dropout inside the blocks shows at the output.
    for layer in model.zero_initialised_layers():
        torch.nn.init.normal_(layer.weight, std=0.1)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        assert not torch.equal(model(x, t), model(x, t))


def test_zero_initialised_layers(cifar_unet):
    # picked by name from the official layout: the last conv of every ResBlock (block2.3), every
    # attention output projection (attn.proj) and the output conv (tail.2)
    zero = re.compile(r"(block2\.3|attn\.proj|tail\.2)\.weight$")
    convs = {name: p for name, p in cifar_unet.named_parameters() if p.dim() == 4}
    chosen = [name for name in convs if zero.search(name)]
    # tail conv + 2 per level down, 3 per level up, 2 middle ResBlocks; 3+3+1 attention projections
    assert len(chosen) == 1 + (4 * 2 + 4 * 3 + 2) + (2 + 3 + 1)
    params = dict(cifar_unet.named_parameters())
    for name, weight in convs.items():
        fan_in = weight[0].numel()
        fan_out = weight.shape[0] * weight[0, 0].numel()
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # xavier-uniform bound
        if name in chosen:
            assert weight.abs().max() <= ZERO_GAIN * bound, name
            assert torch.count_nonzero(params[name.replace("weight", "bias")]) == 0, name
        else:  # every other conv keeps a full-scale xavier initialisation
            assert 0.5 * bound < weight.abs().max() <= bound, name


@pytest.mark.parametrize("in_ch,size,ch_mult,attn", [
    (1, 8, [1, 2], [1]),
    (3, 16, [1, 2, 2], [1]),
    (3, 256, [1, 1, 1, 1, 1, 1], [4]),
])
def test_image_channels_and_sizes(in_ch, size, ch_mult, attn):
    model = UNet(T=10, ch=32, ch_mult=ch_mult, attn=attn, num_res_blocks=1, dropout=0.0,
                 in_ch=in_ch, img_size=size)
    x = torch.randn(1, in_ch, size, size)
    with torch.no_grad():
        assert model(x, torch.tensor([5])).shape == x.shape


def test_learned_variance_output_channels():
    model = UNet(T=10, ch=32, ch_mult=[1, 2], attn=[], num_res_blocks=1, dropout=0.0, in_ch=1, out_ch=2)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8), torch.tensor([0, 9])).shape == (2, 2, 8, 8)


def test_attention_level_out_of_range():
    with pytest.raises(ValueError, match="attn level 2 is out of range"):
        UNet(**{**TINY_UNET, "attn": [2]})


def test_image_size_not_divisible_by_the_halvings():
    with pytest.raises(ValueError, match="img_size 12 is not divisible by 8"):
        UNet(**{**TINY_UNET, "ch_mult": [1, 2, 2, 2]}, img_size=12)
    model = UNet(**TINY_UNET)
    with pytest.raises(ValueError, match="img_size 9 is not divisible by 2"):
        model(torch.randn(1, 3, 9, 9), torch.tensor([0]))


def test_channels_groupnorm_cannot_split():
    with pytest.raises(ValueError, match="GroupNorm"):
        UNet(**{**TINY_UNET, "ch": 48})
    with pytest.raises(ValueError, match="GroupNorm"):
        UNet(**{**TINY_UNET, "ch_mult": [1, 1.5]})
