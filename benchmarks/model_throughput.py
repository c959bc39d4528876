"""Model throughput: inference windows/s and training steps/s per batch size, with FLOPs.

Each figure is also given as a fraction of a dense-matmul baseline measured in the
same run on the same device, so numbers from a shared, noisy machine stay readable.

    python benchmarks/model_throughput.py --out benchmarks/results/model_throughput_cpu.json
    python benchmarks/model_throughput.py --device cuda --out .../model_throughput_cuda.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from stream_detector.model import SMOLLM2, AnomalyLLM, ModelConfig
from trainer.train import TrainConfig, anomalyllm_loss


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, min_seconds: float, min_repeats: int = 2) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    _synchronize(device)
    repeats, started = 0, time.perf_counter()
    while repeats < min_repeats or time.perf_counter() - started < min_seconds:
        fn()
        repeats += 1
    _synchronize(device)
    return (time.perf_counter() - started) / repeats


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, min_seconds: float) -> float:
    """Achieved FLOP/s of a square matmul: the baseline every figure is divided by."""
    size = 2048 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / _timed(lambda: a @ b, device, min_seconds)


def flops_per_window(model: AnomalyLLM, config: ModelConfig, device: torch.device) -> dict:
    x = torch.randn(8, config.channels, config.window_length, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.score(x, attribution=False)
    inference = counter.get_total_flops() / 8
    model.train()
    generator = torch.Generator().manual_seed(0)
    with FlopCounterMode(display=False) as counter:
        anomalyllm_loss(model, x, TrainConfig(), generator).backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    return {"inference": inference, "train_step_per_window": counter.get_total_flops() / 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default=SMOLLM2)
    parser.add_argument("--backbone-layers", type=int, default=6)
    parser.add_argument("--window-length", type=int, default=128)
    parser.add_argument("--patch-length", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    parser.add_argument(
        "--train-batch-sizes",
        type=int,
        nargs="+",
        default=[1, 4, 16, 64],
        help="training is 3x the windows per step (augmented copies); large sizes are slow on CPU",
    )
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    device = torch.device(args.device)
    mixed = device.type == "cuda"
    config = ModelConfig(
        window_length=args.window_length,
        patch_length=args.patch_length,
        patch_stride=args.patch_length,
        backbone=args.backbone,
        backbone_layers=args.backbone_layers,
    )
    model = AnomalyLLM.pretrained(config).to(device).eval()
    # As full as a fitted model's: the recent bank's size sets part of the cost.
    size, length = config.recent_size, config.window_length
    model.fill_recent(torch.randn(size, config.channels, length), torch.arange(size) * length)
    flops = flops_per_window(model, model.config, device)
    peak = matmul_flops_per_s(device, torch.bfloat16 if mixed else torch.float32, args.min_seconds)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed)

    inference = []
    for batch in args.batch_sizes:
        x = torch.randn(batch, config.channels, config.window_length, device=device)

        def run(x: torch.Tensor = x) -> None:
            with autocast:
                model.score(x, attribution=False)

        seconds = _timed(run, device, args.min_seconds)
        achieved = flops["inference"] * batch / seconds
        inference.append(
            {
                "batch_size": batch,
                "windows_per_s": batch / seconds,
                "flops_per_s": achieved,
                "fraction_of_matmul_baseline": achieved / peak,
            }
        )
        print(f"inference batch {batch:5d}: {batch / seconds:10.1f} windows/s")

    training = []
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for batch in args.train_batch_sizes:
        x = torch.randn(batch, config.channels, config.window_length, device=device)

        def step(x: torch.Tensor = x) -> None:
            with autocast:
                loss = anomalyllm_loss(model, x, TrainConfig(), generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        seconds = _timed(step, device, args.min_seconds)
        achieved = flops["train_step_per_window"] * batch / seconds
        training.append(
            {
                "batch_size": batch,
                "steps_per_s": 1 / seconds,
                "windows_per_s": batch / seconds,
                "flops_per_s": achieved,
                "fraction_of_matmul_baseline": achieved / peak,
            }
        )
        print(f"training  batch {batch:5d}: {1 / seconds:10.3f} steps/s")

    result = {
        "benchmark": "model_throughput",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if mixed else platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "mixed_precision": "bf16" if mixed else "off",
        "model": {k: v for k, v in model.config.to_dict().items() if k != "backbone_config"},
        "flops_per_window": flops,
        "matmul_baseline_flops_per_s": peak,
        "inference": inference,
        "training": training,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
