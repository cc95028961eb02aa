"""``dtrain-export``: one subnet of a trained supernet as a standalone model.

1. The arch comes from a JSON file (an arch, or ``{"arch": {...}}``) or from
   a ``dtrain-search`` ``pareto.json`` and the index of a point.
2. Its BN statistics are recalibrated inside the supernet, and the subnet is
   evaluated there on ``eval.split`` (test by default).
3. It is extracted into plain torch layers (the calibrated statistics copied)
   and wrapped with its input step (resize to the arch's resolution, as the
   supernet does), then evaluated again: both must agree.
4. ``out_dir`` gets ``model.safetensors`` (or ``model.pt``, weights-only
   torch.save) with the state dict, ``arch.json`` (arch, model config, input
   spec, costs, both evaluations, provenance), ``model.ts`` (TorchScript:
   loads with ``torch.jit.load`` and no dtrain installed) and, when the
   ``onnx`` package is installed, ``model.onnx``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic_io import atomic_write, atomic_write_bytes
from ..config import ConfigError
from ..obs.table import format_table, human
from ..train.distributed import DistContext, pick_device
from ..train.evaluate import evaluate_arch
from .run import prepare


class ResizedInput(nn.Module):
    """A static image model behind its input step: bilinear resize to ``resolution``
    (antialiased when shrinking), channels-last, exactly as the supernet feeds it."""

    def __init__(self, net: nn.Module, resolution: int):
        super().__init__()
        self.net = net
        self.resolution = resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.resolution
        if x.shape[-1] != r or x.shape[-2] != r:
            x = F.interpolate(x, size=[r, r], mode="bilinear", align_corners=False, antialias=r < x.shape[-1])
        return self.net(x.contiguous(memory_format=torch.channels_last))


def resolve_arch(cfg, space) -> Tuple[dict, str]:
    """(canonical arch, where it came from); one-line ConfigError / ArchError on bad input."""
    if cfg.arch:
        doc = _read_json(cfg.arch, "arch")
        arch = doc.get("arch", doc) if isinstance(doc, dict) else doc
        return space.validate(arch), os.path.abspath(cfg.arch)
    doc = _read_json(cfg.pareto, "pareto")
    points = doc.get("pareto") if isinstance(doc, dict) else None
    if not isinstance(points, list) or not points:
        raise ConfigError(f'pareto={cfg.pareto!r} is not a dtrain-search pareto.json (no "pareto" points)')
    if not -len(points) <= cfg.index < len(points):
        raise ConfigError(
            f"index={cfg.index} is not allowed: {cfg.pareto} has points 0..{len(points) - 1} "
            f"(or -1..-{len(points)} from the end)"
        )
    index = cfg.index % len(points)
    return space.validate(points[index]["arch"]), f"{os.path.abspath(cfg.pareto)}#{index}"


def _read_json(path: str, key: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as ex:
        raise ConfigError(f"{key}={path!r} cannot be read: {ex.strerror}") from ex
    except ValueError as ex:
        raise ConfigError(f"{key}={path!r} is not valid JSON: {ex}") from ex


@torch.no_grad()
def _outputs(model: nn.Module, split, batch_size: int, device, prepare=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of ``model`` over ``split`` in order."""
    logits, targets = [], []
    for start in range(0, len(split), batch_size):
        x, y = split.batch(torch.arange(start, min(len(split), start + batch_size)))
        x = x.to(device)
        logits.append(model(prepare(x) if prepare is not None else x).float().cpu())
        targets.append(y)
    return torch.cat(logits), torch.cat(targets)


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    flat = logits.reshape(-1, logits.shape[-1])
    return float((flat.argmax(-1) == targets.reshape(-1)).double().mean())


def _deployable(model, arch: dict) -> Tuple[nn.Module, dict]:
    static = model.extract(arch).eval()
    if model.task == "lm":
        spec = {
            "kind": "token ids",
            "dtype": "int64",
            "shape": ["batch", f"time <= {model.cfg.block_size}"],
            "output": "logits [batch, time, vocab]",
        }
        return static, spec
    spec = {
        "kind": "images",
        "dtype": "float32",
        "shape": ["batch", model.cfg.in_channels, "H", "W"],
        "resolution": arch["resolution"],
        "output": "logits [batch, classes]",
        "note": "inputs standardised as dtrain's data pipeline does; resized to the resolution inside",
    }
    return ResizedInput(static, arch["resolution"]).eval(), spec


def _save_weights(module: nn.Module, out_dir: str, kind: str) -> str:
    if kind == "safetensors":
        from safetensors.torch import save_model

        path = os.path.join(out_dir, "model.safetensors")
        tmp = path + ".tmp"
        save_model(module, tmp)  # handles tied weights; contiguous copies of channels-last tensors
        os.replace(tmp, path)
        return path
    path = os.path.join(out_dir, "model.pt")
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def _save_torchscript(module: nn.Module, out_dir: str) -> str:
    path = os.path.join(out_dir, "model.ts")
    scripted = torch.jit.script(module)
    atomic_write(path, lambda f: torch.jit.save(scripted, f))
    return path


def onnx_wanted(mode: str) -> bool:
    """Whether to write model.onnx; ConfigError for onnx=on without the onnx package."""
    if mode == "off":
        return False
    try:
        import onnx  # noqa: F401
    except ImportError:
        if mode == "on":
            raise ConfigError(
                "onnx=on is not allowed: the onnx package is not installed "
                "(pip install 'dtrain[onnx]'), or use onnx=auto / off"
            ) from None
        return False
    return True


def _save_onnx(module: nn.Module, example: torch.Tensor, out_dir: str, task: str) -> str:
    """model.onnx for inputs shaped like ``example`` (batch, and time for LMs, dynamic)."""
    path = os.path.join(out_dir, "model.onnx")
    dyn = {"input": {0: "batch", 1: "time"}} if task == "lm" else {"input": {0: "batch"}}
    torch.onnx.export(
        module, (example,), path, input_names=["input"], output_names=["logits"], dynamic_axes=dyn, dynamo=False
    )
    return path


def run_export(cfg) -> dict:
    ctx = DistContext(device=pick_device(cfg.device, 0))
    want_onnx = onnx_wanted(cfg.onnx)  # before any work: a missing package is a config mistake
    src, data, scorer = prepare(cfg, ctx)
    model, split = src.model, getattr(data, cfg.eval.split)
    arch, origin = resolve_arch(cfg, model.space)
    res = evaluate_arch(
        model, arch, split, scorer.calib, cfg.eval.batch_size, ctx.device, model.task, keep_bn=False
    )  # the supernet keeps the calibrated statistics of this arch
    model.set_active(arch)
    model.eval()
    super_logits, targets = _outputs(model, split, cfg.eval.batch_size, ctx.device, prepare=model.adapt_input)
    deploy, spec = _deployable(model, arch)
    deploy.to(ctx.device)
    exp_logits, _ = _outputs(deploy, split, cfg.eval.batch_size, ctx.device)
    os.makedirs(cfg.out_dir, exist_ok=True)
    files: List[str] = [_save_weights(deploy.cpu(), cfg.out_dir, cfg.weights)]
    if cfg.torchscript:
        files.append(_save_torchscript(deploy, cfg.out_dir))
    example = split.batch(torch.arange(min(2, len(split))))[0]
    if want_onnx:
        files.append(_save_onnx(deploy, example, cfg.out_dir, model.task))
        spec["onnx_input_shape"] = ["batch", *example.shape[1:]] if model.task != "lm" else ["batch", "time"]
    metrics = {
        "split": cfg.eval.split,
        "count": int(targets.numel()),
        "accuracy_supernet": accuracy(super_logits, targets),
        "accuracy_export": accuracy(exp_logits, targets),
        "loss_supernet": res["loss"],
        "max_abs_logit_diff": float((super_logits - exp_logits).abs().max()),
    }
    exp_loss = float(F.cross_entropy(exp_logits.reshape(-1, exp_logits.shape[-1]), targets.reshape(-1)))
    metrics["loss_export"] = exp_loss
    if "bpb" in res:
        metrics["bpb_supernet"], metrics["bpb_export"] = res["bpb"], exp_loss / math.log(2)
    doc = {
        "version": 1,
        "space": model.space.name,
        "arch": arch,
        "arch_from": origin,
        "model_config": dataclasses.asdict(src.model_cfg),
        "data": data.name,
        "input": spec,
        "cost": model.cost(arch),
        "metrics": metrics,
        "source": src.info,
        "files": [os.path.basename(f) for f in files] + ["arch.json"],
    }
    atomic_write_bytes(os.path.join(cfg.out_dir, "arch.json"), (json.dumps(doc, indent=1) + "\n").encode())
    for name in doc["files"]:  # artifacts to hand out: readable like any other file
        os.chmod(os.path.join(cfg.out_dir, name), 0o644)
    _print(doc, cfg.out_dir)
    return doc


def _print(doc: dict, out_dir: str) -> None:
    m = doc["metrics"]
    lm = "bpb_supernet" in m
    rows = [
        ["in the supernet (calibrated)", f"{100 * m['accuracy_supernet']:.2f}"],
        ["exported", f"{100 * m['accuracy_export']:.2f}"],
    ]
    if lm:
        rows[0].append(f"{m['bpb_supernet']:.4f}")
        rows[1].append(f"{m['bpb_export']:.4f}")
    print(
        format_table(
            ["subnet", f"{m['split']} acc %"] + (["bpb"] if lm else []),
            rows,
            title=f"exported {doc['space']} subnet: {human(doc['cost']['macs'])} MACs, "
            f"{human(doc['cost']['params'])} params",
        )
    )
    print(
        f"max |logit difference| {m['max_abs_logit_diff']:.2e} over {m['count']} targets; "
        f"wrote {', '.join(doc['files'])} to {out_dir}",
        flush=True,
    )
