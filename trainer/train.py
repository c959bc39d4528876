"""Joint training of teacher and student on normal windows (AnomalyLLM objective).

Per batch of B windows: augmented copies by jitter and per-timestep scaling
(optionally time warping); knowledge distillation pulls the student onto the
teacher on originals and pushes it away on augmented copies; a contrastive term
keeps the teacher invariant to the augmentations. Early stopping watches a
validation split taken from the end of the training data, never test labels.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stream_detector.model import AnomalyLLM, ModelConfig
from trainer.prototypes import init_prototypes, refit_prototypes

log = logging.getLogger(__name__)

# Held-back windows that standardise a fused score's terms (more add little but time).
MAX_CALIBRATION_WINDOWS = 2048
REFRESH_MAX_WINDOWS = 4096  # k-means input cap for refresh


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and augmentation settings; the profiles below are presets."""

    epochs: int = 8
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    kd_weight: float = 1.0
    contrastive_weight: float = 0.1
    jitter_sigma: float = 0.3  # noise std, in units of each window's channel std
    scale_mean: float = 2.0  # per-timestep scaling factors ~ N(scale_mean, scale_sigma)
    scale_sigma: float = 0.5
    time_warp: bool = False
    validation_fraction: float = 0.2
    patience: int = 2
    max_train_windows: int = 192
    kmeans_init: bool = True
    seed: int = 0
    time_budget_s: float | None = None


PROFILES: dict[str, TrainConfig] = {
    "quick": TrainConfig(epochs=4, max_train_windows=128),
    "default": TrainConfig(),
}


@dataclass
class TrainResult:
    """The trained model and how training went."""

    model: AnomalyLLM
    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    train_windows: int = 0
    validation_windows: int = 0
    stopped_by: str = "epochs"

    def summary(self) -> dict[str, float | int | str]:
        return {
            "best_epoch": self.best_epoch,
            "best_validation_loss": min(self.validation_loss, default=math.nan),
            "epochs_run": len(self.train_loss),
            "train_windows": self.train_windows,
            "validation_windows": self.validation_windows,
            "seconds": round(self.seconds, 2),
            "stopped_by": self.stopped_by,
        }


def sliding_windows(series: np.ndarray, length: int, stride: int) -> np.ndarray:
    """Windows of a [T, C] series as [N, C, length], one every `stride` steps."""
    if series.ndim != 2:
        raise ValueError(f"series must be [T, C], got shape {series.shape}")
    if series.shape[0] < length:
        raise ValueError(f"series of {series.shape[0]} steps is shorter than a window ({length})")
    view = np.lib.stride_tricks.sliding_window_view(series, length, axis=0)  # (T-L+1, C, L)
    return np.ascontiguousarray(view[::stride], dtype=np.float32)


def jitter(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    scale = x.std(dim=-1, keepdim=True, unbiased=False) + 1e-5
    noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
    return x + sigma * scale * noise


def scaling(x: torch.Tensor, mean: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    factors = mean + sigma * torch.randn(x.shape, generator=generator, device="cpu")
    return x * factors.to(x.device)


def time_warp(x: torch.Tensor, generator: torch.Generator, strength: float = 0.2) -> torch.Tensor:
    """Resample each window along a random smooth monotone time axis."""
    batch, _, length = x.shape
    knots = 1 + strength * torch.randn(batch, 4, generator=generator)
    speed = F.interpolate(
        knots.clamp(min=0.1).unsqueeze(1), size=length, mode="linear", align_corners=True
    ).squeeze(1)
    position = torch.cumsum(speed, dim=1)
    position = (position - position[:, :1]) / (position[:, -1:] - position[:, :1]) * 2 - 1
    grid = torch.stack([position, torch.zeros_like(position)], dim=-1).unsqueeze(1)
    warped = F.grid_sample(x.unsqueeze(2), grid.to(x.device), align_corners=True)
    return warped.squeeze(2)


def anomalyllm_loss(
    model: AnomalyLLM, x: torch.Tensor, config: TrainConfig, generator: torch.Generator
) -> torch.Tensor:
    """w1 * KD + w2 * CT on one batch (B, C, L) and its 2B augmented copies."""
    batch = x.shape[0]
    jittered = jitter(x, config.jitter_sigma, generator)
    scaled = scaling(x, config.scale_mean, config.scale_sigma, generator)
    if config.time_warp:
        scaled = time_warp(scaled, generator)
    c, z, _ = model(torch.cat([x, jittered, scaled]))  # (3B, d) each
    distance = torch.linalg.vector_norm(c.float() - z.float(), dim=-1)  # (3B,)
    # -log(1 - exp(-d)) written with expm1 for stability near d = 0.
    push = -torch.log((-torch.expm1(-distance[batch:])).clamp(min=1e-6))
    kd = torch.cat([distance[:batch], push]).mean()
    original, jitter_c, scaled_c = c.float().split(batch)
    contrastive = (
        2 - F.cosine_similarity(original, scaled_c) - F.cosine_similarity(original, jitter_c)
    ).mean()
    return config.kd_weight * kd + config.contrastive_weight * contrastive


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _validation_loss(
    model: AnomalyLLM, windows: torch.Tensor, config: TrainConfig, device: torch.device
) -> float:
    # The same augmentation draws every epoch, so epochs are comparable.
    generator = torch.Generator().manual_seed(config.seed + 1)
    model.eval()
    total = 0.0
    with torch.no_grad(), _autocast(device):
        for start in range(0, len(windows), config.batch_size):
            batch = windows[start : start + config.batch_size].to(device)
            total += anomalyllm_loss(model, batch, config, generator).item() * len(batch)
    model.train()
    return total / len(windows)


def fit(
    windows: np.ndarray,
    model_config: ModelConfig,
    config: TrainConfig = PROFILES["default"],
    device: str | torch.device = "cpu",
    model: AnomalyLLM | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train on normal windows [N, C, L]; the last `validation_fraction` validates."""
    started = time.perf_counter()
    device = torch.device(device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    windows_t = torch.from_numpy(thin(windows, config.max_train_windows))
    validation_count = max(1, int(len(windows_t) * config.validation_fraction))
    if len(windows_t) - validation_count < model_config.prototypes:
        raise ValueError(
            f"{len(windows_t)} windows are too few to train {model_config.prototypes} "
            "prototypes with a validation split; give more data or fewer prototypes"
        )
    train, validation = windows_t[:-validation_count], windows_t[-validation_count:]
    model = model or AnomalyLLM.pretrained(model_config)
    model.fit_normalisation(train)
    if config.kmeans_init:
        init_prototypes(model, train, seed=config.seed)
    model.to(device).train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.learning_rate,
        total_steps=config.epochs * steps_per_epoch,
        pct_start=0.1,
    )
    result = TrainResult(model, train_windows=len(train), validation_windows=len(validation))
    best_state, stale = None, 0
    bar = tqdm(range(config.epochs), desc="train", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        order = torch.randperm(len(train), generator=generator)
        epoch_loss = 0.0
        for start in range(0, len(train), config.batch_size):
            batch = train[order[start : start + config.batch_size]].to(device)
            with _autocast(device):
                loss = anomalyllm_loss(model, batch, config, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            epoch_loss += loss.item() * len(batch)
        result.train_loss.append(epoch_loss / len(train))
        result.validation_loss.append(_validation_loss(model, validation, config, device))
        bar.set_postfix(
            train=f"{result.train_loss[-1]:.3f}", val=f"{result.validation_loss[-1]:.3f}"
        )
        if result.validation_loss[-1] <= min(result.validation_loss):
            best_state, stale = copy.deepcopy(model.state_dict()), 0
            result.best_epoch = epoch
        else:
            stale += 1
        if stale >= config.patience:
            result.stopped_by = "early_stopping"
            break
        elapsed = time.perf_counter() - started
        if config.time_budget_s is not None and elapsed * (epoch + 2) / (epoch + 1) > (
            config.time_budget_s
        ):
            result.stopped_by = "time_budget"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    calibrate_score(model, windows, config.validation_fraction)
    result.seconds = time.perf_counter() - started
    log.info("trained: %s", result.summary())
    return result


def calibrate_score(model: AnomalyLLM, windows: np.ndarray, held_back_fraction: float) -> None:
    """Calibrate a fused score on normal windows [N, C, L] in time order (else nothing).

    The memory bank comes from every window before the last ``held_back_fraction``, and
    the terms are standardised on that last part, which neither the bank nor (in ``fit``)
    the networks saw.
    """
    held_back = max(1, int(len(windows) * held_back_fraction))
    model.calibrate(
        torch.from_numpy(windows[:-held_back]),
        torch.from_numpy(thin(windows[-held_back:], MAX_CALIBRATION_WINDOWS)),
    )


def refresh(
    model: AnomalyLLM, windows: np.ndarray, held_back_fraction: float, memory_only: bool = False
) -> int:
    """``trainer refresh``: new prototypes, memory bank and calibration from recent windows.

    Every network weight stays; the prototypes move to the k-means centroids of (at most
    ``REFRESH_MAX_WINDOWS`` of) the windows [N, C, L], in time order, and the fused score
    is re-calibrated on them (`calibrate_score`). Returns the number of k-means windows.
    ``memory_only``: only the memory bank is refilled, from the windows before the
    held-back part (the prototypes and the score's scale stay); returns 0.
    """
    if memory_only:
        held_back = max(1, int(len(windows) * held_back_fraction))
        model.fill_memory(torch.from_numpy(windows[:-held_back]))
        return 0
    chosen = thin(windows, REFRESH_MAX_WINDOWS)
    if len(chosen) < model.config.prototypes:
        raise ValueError(
            f"{len(chosen)} training windows are too few for "
            f"{model.config.prototypes} prototypes; read a longer period"
        )
    refit_prototypes(model, torch.from_numpy(chosen))
    calibrate_score(model, windows, held_back_fraction)
    return len(chosen)


def thin(windows: np.ndarray, limit: int) -> np.ndarray:
    """Keep at most `limit` windows, evenly spaced so the temporal split stays valid."""
    if len(windows) <= limit:
        return windows
    keep = np.linspace(0, len(windows) - 1, limit).round().astype(int)
    return windows[keep]


def profile(name: str, **overrides: object) -> TrainConfig:
    """A named training profile with optional overrides."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return dataclasses.replace(PROFILES[name], **overrides)
