"""Converted weights reproduce PyTorch. The reference networks below are written here with
torchvision's module / key names (torchvision itself is not importable beside this torch),
given random weights and random BN running statistics, and run in eval mode."""
import math

import pytest

torch = pytest.importorskip("torch")  # guard only: CI installs torch with the test extras

import jax  # noqa: E402
import numpy as np  # noqa: E402
from torch import nn  # noqa: E402

from dvp_jax import checkpoints, models  # noqa: E402
from dvp_jax import convert_torch as convert_cli  # noqa: E402
from dvp_jax.models import torch_weights  # noqa: E402
from dvp_jax.models.layers import make_divisible  # noqa: E402
from dvp_jax.models.mobilenet_v3 import LARGE  # noqa: E402
from dvp_jax.models.efficientnet import B0  # noqa: E402

ATOL = 1e-4


# ------------------------------------------------------------ torchvision-named references


class TBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride, downsample, groups=1, base_width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + idt)


class TBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride, downsample, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + idt)


class TResNet(nn.Module):
    """torchvision.models.ResNet (v1.5); ``fc`` is Linear, an MLP Sequential, or absent."""

    def __init__(self, block, layers, num_classes=0, mlp=(), groups=1, width_per_group=64,
                 width=1.0, small_stem=False):
        super().__init__()
        c = round(64 * width)
        self.conv1 = (nn.Conv2d(3, c, 3, 1, 1, bias=False) if small_stem
                      else nn.Conv2d(3, c, 7, 2, 3, bias=False))
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.maxpool = nn.Identity() if small_stem else nn.MaxPool2d(3, 2, 1)
        for s, n in enumerate(layers):
            planes, blocks = round(64 * 2 ** s * width), []
            for b in range(n):
                stride = 2 if (b == 0 and s > 0) else 1
                ds = None
                if b == 0 and (stride != 1 or c != planes * block.expansion):
                    ds = nn.Sequential(nn.Conv2d(c, planes * block.expansion, 1, stride,
                                                 bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
                blocks.append(block(c, planes, stride, ds, groups, width_per_group))
                c = planes * block.expansion
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        if mlp:
            self.fc = nn.Sequential(nn.Linear(c, mlp[0]), nn.ReLU(), nn.Linear(mlp[0], mlp[1]))
        elif num_classes:
            self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for s in range(1, 5):
            x = getattr(self, f"layer{s}")(x)
        pooled = x.mean((2, 3))
        return pooled, (self.fc(pooled) if hasattr(self, "fc") else None)


def _cbna(cin, cout, k, s=1, groups=1, act=None, eps=1e-5):
    """torchvision's Conv2dNormActivation (keys .0 conv, .1 BN)."""
    layers = [nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout, eps=eps)]
    return nn.Sequential(*(layers + ([act()] if act else [])))


class TSE(nn.Module):
    def __init__(self, c, sq, act, gate):
        super().__init__()
        self.fc1, self.fc2, self.act, self.gate = nn.Conv2d(c, sq, 1), nn.Conv2d(sq, c, 1), act(), gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))


class TResidual(nn.Module):
    def __init__(self, layers, res):
        super().__init__()
        self.block, self.res = nn.Sequential(*layers), res

    def forward(self, x):
        y = self.block(x)
        return y + x if self.res else y


class TMobileNetV3Large(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        feats, eps = [_cbna(3, 16, 3, 2, act=nn.Hardswish, eps=1e-3)], 1e-3
        for cin, k, cexp, cout, se, a, s in LARGE:
            act = nn.Hardswish if a == "HS" else nn.ReLU
            layers = [] if cexp == cin else [_cbna(cin, cexp, 1, act=act, eps=eps)]
            layers.append(_cbna(cexp, cexp, k, s, groups=cexp, act=act, eps=eps))
            if se:
                layers.append(TSE(cexp, make_divisible(cexp // 4, 8), nn.ReLU, nn.Hardsigmoid))
            layers.append(_cbna(cexp, cout, 1, eps=eps))
            feats.append(TResidual(layers, s == 1 and cin == cout))
        feats.append(_cbna(160, 960, 1, act=nn.Hardswish, eps=eps))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Linear(960, 1280), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(1280, num_classes))

    def forward(self, x):
        h = self.classifier[1](self.classifier[0](self.features(x).mean((2, 3))))
        return h, self.classifier[3](h)


class TEfficientNetB0(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        feats = [_cbna(3, 32, 3, 2, act=nn.SiLU)]
        for e, k, s, cin, cout, n in B0:
            stage = []
            for b in range(n):
                ci, st = (cin, s) if b == 0 else (cout, 1)
                cexp = make_divisible(ci * e, 8)
                layers = [] if cexp == ci else [_cbna(ci, cexp, 1, act=nn.SiLU)]
                layers += [_cbna(cexp, cexp, k, st, groups=cexp, act=nn.SiLU),
                           TSE(cexp, max(1, ci // 4), nn.SiLU, nn.Sigmoid), _cbna(cexp, cout, 1)]
                stage.append(TResidual(layers, st == 1 and ci == cout))
            feats.append(nn.Sequential(*stage))
        feats.append(_cbna(320, 1280, 1, act=nn.SiLU))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        h = self.features(x).mean((2, 3))
        return h, self.classifier(h)


def _randomise(net, seed):
    """He-normal (fan_out) conv weights, default Linear init, random BN affine and running
    statistics; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                std = math.sqrt(2.0 / (m.out_channels * m.kernel_size[0] * m.kernel_size[1]))
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) * 0.4 + 0.2)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                m.weight.copy_((torch.rand(m.weight.shape, generator=g) * 2 - 1) * bound)
                m.bias.copy_((torch.rand(m.bias.shape, generator=g) * 2 - 1) * bound)
    return net.eval()


def _numpy_sd(net, prefix=""):
    return {prefix + k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def _run_both(net, sd, arch, res, batch=2, seed=0, **convert_kw):
    x = np.random.default_rng(seed).normal(size=(batch, 3, res, res)).astype(np.float32)
    with torch.no_grad():
        t_pooled, t_head = net(torch.from_numpy(x))
    variables, kwargs = torch_weights.torch_state_dict_to_flax(sd, arch, **convert_kw)
    model = models.build(arch, **kwargs)
    out = jax.jit(lambda v, x: model.apply(v, x, False))(variables, x.transpose(0, 2, 3, 1))
    return out, t_pooled.numpy(), None if t_head is None else t_head.numpy(), kwargs


def _close(a, b, what):
    err = float(np.abs(np.asarray(a) - b).max())
    print(f"{what}: max abs error {err:.2e}, max |ref| {float(np.abs(b).max()):.3f}")
    assert err < ATOL, f"{what}: max abs error {err:.2e} (scale {float(np.abs(b).max()):.2f})"


# --------------------------------------------------------------------------------- tests

RESNET_CASES = [
    # arch, block, layers, extra, res
    ("resnet18", TBasicBlock, (2, 2, 2, 2), {}, 64),
    ("resnet50", TBottleneck, (3, 4, 6, 3), {}, 64),
    ("resnet18", TBasicBlock, (2, 2, 2, 2), dict(small_stem=True), 32),
    ("resnext50_32x4d", TBottleneck, (3, 4, 6, 3), dict(groups=32, width_per_group=4,
                                                        width=0.25), 64),
]


@pytest.mark.parametrize("arch,block,layers,extra,res", RESNET_CASES)
def test_resnet_matches_pytorch(arch, block, layers, extra, res):
    net = _randomise(TResNet(block, layers, num_classes=10, **extra), seed=1)
    out, t_pooled, t_logits, kwargs = _run_both(net, _numpy_sd(net), arch, res)
    assert kwargs["num_classes"] == 10
    assert kwargs["small_stem"] == extra.get("small_stem", False)
    assert kwargs["width_multiplier"] == extra.get("width", 1.0)
    assert float(np.abs(t_logits).max()) > 0.1          # a non-degenerate comparison
    _close(out["pooled"], t_pooled, "pooled")
    _close(out["logits"], t_logits, "logits")


def test_moco_layout_maps_mlp_to_projection(tmp_path):
    q = _randomise(TResNet(TBasicBlock, (2, 2, 2, 2), mlp=(64, 16)), seed=2)
    k = _randomise(TResNet(TBasicBlock, (2, 2, 2, 2), mlp=(64, 16)), seed=3)
    state = {**_numpy_sd(q, "module.encoder_q."), **_numpy_sd(k, "module.encoder_k."),
             "module.queue": np.random.default_rng(0).normal(size=(16, 32)).astype(np.float32),
             "module.queue_ptr": np.zeros(1, np.int64)}
    out, t_pooled, t_proj, kwargs = _run_both(q, state, "resnet18", 64)
    assert kwargs["projection_dims"] == [64, 16] and kwargs["num_classes"] == 0
    assert "logits" not in out
    _close(out["pooled"], t_pooled, "pooled")
    _close(out["projection"], t_proj, "projection")

    # The same through a .pth.tar file and the CLI, read back as a dvp_jax checkpoint.
    path = tmp_path / "moco.pth.tar"
    torch.save({"epoch": 3, "arch": "resnet18",
                "state_dict": {k_: torch.from_numpy(v) for k_, v in state.items()}}, path)
    assert convert_cli.main(["--torch", str(path), "--arch", "resnet18",
                             "--out", str(tmp_path / "ckpt")]) == 0
    meta, variables = checkpoints.load_model_variables(str(tmp_path / "ckpt"))
    assert meta["trainer"] == "converted" and meta["prefix"] == "module.encoder_q."
    assert meta["source"] == str(path)
    assert models.build(**meta["model"]) == models.build("resnet18", **kwargs)
    direct, _ = torch_weights.torch_state_dict_to_flax(state, "resnet18")
    assert jax.tree.structure(variables) == jax.tree.structure(direct)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(direct)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # A wrong architecture fails with exit status 2 and names a key.
    assert convert_cli.main(["--torch", str(path), "--arch", "resnet34",
                             "--out", str(tmp_path / "ckpt34")]) == 2


def test_shape_mismatch_from_a_torch_model_names_the_key():
    net = TResNet(TBasicBlock, (2, 2, 2, 2), num_classes=10, width=0.5)
    sd = _numpy_sd(net)
    sd["layer4.1.bn1.weight"] = np.ones(7, np.float32)
    with pytest.raises(torch_weights.ConversionError,
                       match=r"layer4\.1\.bn1\.weight.*\(7,\).*\(256,\)"):
        torch_weights.torch_state_dict_to_flax(sd, "resnet18")


@pytest.mark.parametrize("arch,cls", [("mobilenet_v3_large", TMobileNetV3Large),
                                      ("efficientnet_b0", TEfficientNetB0)])
def test_mobile_students_match_pytorch(arch, cls):
    net = _randomise(cls(num_classes=10), seed=4)
    out, t_pooled, t_logits, kwargs = _run_both(net, _numpy_sd(net), arch, 64)
    assert kwargs["num_classes"] == 10
    assert float(np.abs(t_logits).max()) > 0.01
    _close(out["pooled"], t_pooled, "pooled")
    _close(out["logits"], t_logits, "logits")
