"""Activation checkpointing (``with_cp``) and the heads' ``recompute``: the same loss, gradients
and BatchNorm running statistics as without, bit for bit; nothing changes in eval mode; less
kept for backward; the config field, ``--set``, ``init_model`` and ``ocrnet bench
--train-memory``.

Bitwise equality is the right bar: a checkpointed segment runs the same operations on the same
inputs again, and backward runs the same graph (only where its saved tensors come from
differs), so every number is the same float.
"""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
import torch.utils.checkpoint

import ocrnet
import ocrnet.models.recompute
from ocrnet.cli import main as cli_main
from ocrnet.configs import SYNTHETIC_CONFIGS, apply_overrides
from ocrnet.engine import TrainOptions
from ocrnet.models import build_segmentor
from ocrnet.models.resnet import ResNetV1c
from ocrnet.utils.memory import saved_tensor_bytes
from test_modules import randomise_batchnorm

TINY = "ocrnet_hrtiny8_1xb4-20_synthetic-32x64"
pytestmark = pytest.mark.usefixtures("one_thread")


def _hrnet_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomise_batchnorm(build_segmentor(SYNTHETIC_CONFIGS[TINY]).train())


def _resnet_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomise_batchnorm(ResNetV1c(50, stem_channels=8, base_channels=4).train())


def _batch(classes: int = 4):
    g = torch.Generator().manual_seed(3)
    img = torch.randn(2, 3, 32, 64, generator=g)
    labels = torch.randint(0, classes, (2, 32, 64), generator=g)
    labels[:, :4] = 255
    return img, labels


def _loss(model, img, labels):
    if isinstance(model, ResNetV1c):  # a fixed random projection of every stage's output
        g = torch.Generator().manual_seed(5)
        return sum((f * torch.randn(f.shape, generator=g)).sum() for f in model(img))
    return model.loss(img, labels)["loss"]


def _train(model, steps: int = 2):
    """``steps`` SGD steps; the losses, the last step's gradients and the buffers."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    img, labels = _batch()
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, img, labels)
        loss.backward()
        losses.append(loss.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return losses, grads, {n: b.clone() for n, b in model.named_buffers()}


def _set_lean(model, on: bool) -> None:
    if isinstance(model, ResNetV1c):
        model.with_cp = on
    else:
        model.with_cp = model.recompute = on


@pytest.mark.parametrize("make", [_hrnet_model, _resnet_backbone], ids=["hrnet", "resnet"])
def test_checkpointing_gives_the_same_loss_gradients_and_running_stats(make, monkeypatch):
    base = make()
    plain, lean = copy.deepcopy(base), copy.deepcopy(base)
    _set_lean(lean, True)
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    losses, grads, buffers = _train(plain)
    assert not calls
    losses_cp, grads_cp, buffers_cp = _train(lean)
    assert len(calls) >= 10  # the segments did run checkpointed
    assert all(torch.equal(a, b) for a, b in zip(losses, losses_cp))
    assert grads.keys() == grads_cp.keys()
    # The first segment's input (the image) does not require grad; its weights get theirs.
    stem = "stem.0.weight" if "stem.0.weight" in grads else "backbone.conv1.weight"
    assert grads_cp[stem].abs().sum() > 0
    for name, g in grads.items():
        assert torch.equal(g, grads_cp[name]), name
    for name, b in buffers.items():  # running_mean / running_var / num_batches_tracked
        assert torch.equal(b, buffers_cp[name]), name
    assert all(v.item() == 2 for n, v in buffers.items() if n.endswith("num_batches_tracked"))

    # Without the recompute context, the rerun updates the running statistics a second time.
    monkeypatch.setattr(ocrnet.models.recompute, "keep_batchnorm_stats",
                        lambda modules: contextlib.nullcontext())
    again = copy.deepcopy(base)
    _set_lean(again, True)
    _, _, twice = _train(again)
    first_bn = stem.replace("0.weight", "1.num_batches_tracked").replace(
        "conv1.weight", "bn1.num_batches_tracked")
    assert twice[first_bn].item() == 4 and buffers[first_bn].item() == 2
    assert any(not torch.equal(b, twice[n]) for n, b in buffers.items() if "running" in n)


def test_eval_and_no_grad_do_not_checkpoint(monkeypatch):
    model = _hrnet_model()
    lean = copy.deepcopy(model)
    _set_lean(lean, True)
    img, labels = _batch()
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *a, **k: pytest.fail("checkpointed outside training"))
    model.eval(), lean.eval()
    assert torch.equal(model(img), lean(img))
    with torch.no_grad():
        model.train(), lean.train()
        assert torch.equal(model.loss(img, labels)["loss"], lean.loss(img, labels)["loss"])
    # The no-grad training forward above updated both models' statistics alike.
    for (n, a), b in zip(model.named_buffers(), lean.buffers()):
        assert torch.equal(a, b), n


def test_lean_mode_keeps_less_for_backward():
    model = _hrnet_model()
    img, labels = _batch()
    exclude = (img, labels, *model.parameters())

    def saved(with_cp: bool, recompute: bool) -> int:
        model.with_cp, model.recompute = with_cp, recompute
        return saved_tensor_bytes(lambda: model.loss(img, labels), exclude)[1]

    fused, heads, lean = saved(False, False), saved(False, True), saved(True, True)
    # Measured at this size: 0.63x and 0.21x of the fused mode.
    assert heads < 0.75 * fused and lean < 0.3 * fused, (fused, heads, lean)
    assert 0 < saved(True, False) < fused


def test_config_field_overrides_and_init_model():
    cfg, _ = apply_overrides(SYNTHETIC_CONFIGS[TINY], TrainOptions(),
                             ["model.backbone.with_cp=True", "model.recompute=True"])
    model = build_segmentor(cfg)
    assert model.with_cp and model.recompute and model.ocr_head.object_context_block.recompute
    assert not build_segmentor(SYNTHETIC_CONFIGS[TINY]).with_cp
    with pytest.raises(ValueError, match="model.backbone.with_cp: expected a bool"):
        apply_overrides(cfg, TrainOptions(), ["model.backbone.with_cp=yes"])
    name = "ocrnet_r101-d8_4xb2-40k_cityscapes-512x1024"
    with torch.device("meta"):
        net = ocrnet.init_model(name, device="meta", with_cp=True, recompute=True)
    assert net.with_cp and net.recompute and net.config.model.backbone.with_cp
    assert not net.training  # eval mode: checkpointing is inert until model.train()
    with pytest.raises(TypeError, match="with_cp must be a bool"):
        ocrnet.init_model(name, with_cp="yes")


def test_training_run_with_the_lean_mode_matches_the_default(tmp_path):
    from ocrnet.engine import train
    from test_ocrnet_train import final_state, losses, opts

    sets = ["schedule.iterations=3"]
    train(TINY, opts(tmp_path / "plain"), sets)
    train(TINY, opts(tmp_path / "lean"),
          sets + ["model.backbone.with_cp=True", "model.recompute=True"])
    assert losses(tmp_path / "plain") == losses(tmp_path / "lean")
    a, b = final_state(tmp_path / "plain"), final_state(tmp_path / "lean")
    assert b["meta"]["config_dict"]["model"]["backbone"]["with_cp"] is True
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_bench_train_memory_plumbing(tmp_path, capsys):
    path = tmp_path / "tm.json"
    assert cli_main(["bench", "--train-memory", TINY, "--shape", "32", "64", "--steps", "1",
                     "--warmup", "0", "--device", "cpu", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fused+recompute+with_cp" in out and "batch 2, 32x64, cpu" in out
    rows = json.loads(path.read_text())
    assert [r["mode"] for r in rows] == ["reference", "fused", "fused+recompute",
                                         "fused+recompute+with_cp"]
    by = {r["mode"]: r for r in rows}
    assert by["reference"]["saved_vs_reference"] == 1.0 and by["fused"]["step_vs_fused"] == 1.0
    assert by["fused+recompute+with_cp"]["saved_gib"] < by["fused"]["saved_gib"]
    assert all(r["mmseg_saved_gib"] is None and r["step_s"] > 0 for r in rows)
    assert all(r["peak_mib"] > 0 for r in rows)  # Linux: the process's peak RSS
    assert cli_main(["bench", "--train-memory", TINY, "--batch", "0"]) == 1
    assert "batch and steps must be >= 1" in capsys.readouterr().err
    assert cli_main(["bench", TINY, TINY]) == 1
    assert "one config at a time without --train-memory" in capsys.readouterr().err


def test_two_process_syncbn_training_with_the_lean_mode_matches_the_default(tmp_path):
    """torchrun, 2 ranks, SyncBatchNorm: the reruns of the checkpointed segments run SyncBN's
    collectives again in backward, in the same order on both ranks (no hang), and the run's
    losses and weights are those of the same run without checkpointing, bit for bit."""
    import subprocess
    import sys

    from test_ocrnet_train import ENV, final_state, free_port, losses

    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(SYNTHETIC_CONFIGS[TINY].to_dict()))
    sets = ["train.num_workers=0", "train.log_interval=1", "train.checkpoint_interval=0",
            "train.validate=False", "train.synthetic_train_length=64", "schedule.iterations=2",
            "data.batch_per_gpu=2"]
    for run, extra in (("plain", []), ("lean", ["model.backbone.with_cp=True",
                                                 "model.recompute=True"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "ocrnet",
               "train", str(cfg_path), "--work-dir", str(tmp_path / run), "--device", "cpu",
               "--set", *sets, *extra]
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert losses(tmp_path / "plain") == losses(tmp_path / "lean")
    a, b = final_state(tmp_path / "plain"), final_state(tmp_path / "lean")
    assert a["meta"]["world_size"] == 2
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
