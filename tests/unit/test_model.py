"""The AnomalyLLM model: shapes, the frozen/trainable split, scoring and attribution."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from stream_detector.checkpoint import load_checkpoint, save_checkpoint
from stream_detector.devtools.tiny import TINY_LLAMA, tiny_config, tiny_model
from stream_detector.model import (
    AnomalyLLM,
    ModelConfig,
    _argmax_last,
    instance_norm,
    load_backbone,
)

pytestmark = pytest.mark.unit

FUSED = ("discrepancy", "memory", "level", "scale", "point", "steps", "short_steps", "quiet")
PAPER = ("discrepancy",)


@pytest.mark.parametrize("backbone_config", [None, TINY_LLAMA], ids=["gpt2", "llama"])
def test_score_shapes_for_multichannel_windows(backbone_config: dict | None) -> None:
    torch.manual_seed(0)
    model = AnomalyLLM.from_config(tiny_config(backbone_config, channels=3)).eval()
    scores = model.score(torch.randn(5, 3, 32))
    assert scores.score.shape == (5,)
    assert (scores.score >= 0).all()
    assert scores.nearest_prototype.shape == (5, 3)
    assert int(scores.nearest_prototype.max()) < model.config.prototypes
    assert scores.attribution.shape == (5, 3)
    assert torch.allclose(scores.attribution.sum(dim=1), torch.ones(5), atol=1e-5)


def test_a_flat_channel_gets_no_attribution() -> None:
    # Occluding a channel that is already flat changes nothing, so it explains nothing.
    model = tiny_model(channels=2, score_terms=PAPER).eval()
    x = torch.randn(8, 2, 32)
    x[:, 1] = 3.0
    scores = model.score(x)
    assert torch.equal(scores.attribution[:, 1], torch.zeros(8))
    assert torch.equal(scores.attribution[:, 0], torch.ones(8))


def test_single_channel_attribution_is_one() -> None:
    scores = tiny_model().eval().score(torch.randn(4, 1, 32))
    assert torch.equal(scores.attribution, torch.ones(4, 1))


def test_attention_and_token_embeddings_frozen_norms_and_patching_train() -> None:
    model = tiny_model()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    backbone = {name for name, _ in model.named_parameters() if ".backbone." in name}
    assert any("attn" in name for name in backbone)
    assert not any(
        "attn" in name or "mlp" in name or "wte" in name for name in backbone & trainable
    )
    assert any(".ln_" in name for name in backbone & trainable)
    assert any("wpe" in name for name in backbone & trainable)
    assert "teacher.patcher.embed.weight" in trainable
    assert "student.prototypes" in trainable


def test_backbone_mlp_can_train() -> None:
    model = tiny_model(train_backbone_mlp=True)
    assert any("mlp" in n for n, p in model.named_parameters() if p.requires_grad)


def test_instance_norm_removes_offset_and_scale() -> None:
    x = torch.randn(3, 2, 32)
    assert torch.allclose(instance_norm(x * 7 + 100), instance_norm(x), atol=1e-4)


def test_the_papers_score_is_invariant_to_offset_and_gain() -> None:
    model = tiny_model(score_terms=PAPER).eval()
    x = torch.randn(4, 1, 32)
    assert torch.allclose(model.score(x).score, model.score(3 * x - 50).score, atol=1e-3)


def test_config_rejects_window_shorter_than_patch() -> None:
    with pytest.raises(ValueError, match="shorter than patch_length"):
        ModelConfig(window_length=8, patch_length=16).validate()


def test_config_round_trip_refuses_unknown_keys() -> None:
    config = tiny_config()
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**config.to_dict(), "windowlength": 3})


def sine_windows(count: int, phase_step: float = 0.37, length: int = 32) -> torch.Tensor:
    """Noisy sine windows at shifting phases, the normal shape of these tests. (N, 1, L)"""
    generator = torch.Generator().manual_seed(0)
    time = torch.arange(length) * 2 * torch.pi / 16
    phases = torch.arange(count).unsqueeze(1) * phase_step
    noise = 0.05 * torch.randn(count, length, generator=generator)
    return (torch.sin(time + phases) + noise).unsqueeze(1)


@pytest.fixture
def fused_model() -> AnomalyLLM:
    model = tiny_model(score_terms=FUSED, memory_size=64).eval()
    model.calibrate(sine_windows(200), sine_windows(100, phase_step=0.41))
    return model


def test_the_default_score_fuses_every_term() -> None:
    assert ModelConfig().score_terms == FUSED
    assert ModelConfig().fused


def test_the_papers_score_is_the_raw_distance_and_needs_no_calibration() -> None:
    model = tiny_model(score_terms=PAPER).eval()
    x = torch.randn(6, 1, 32)
    with torch.no_grad():
        assert torch.allclose(model.score(x).score, model.distance(x)[0])
    assert "memory" not in model.state_dict()


def test_a_fused_score_is_low_on_normal_windows_and_high_on_each_kind_of_anomaly(
    fused_model: AnomalyLLM,
) -> None:
    normal = sine_windows(50, phase_step=0.53)
    normal_scores = fused_model.score(normal).score
    shape = normal.clone()
    shape[:, :, 10:14] = 0.0  # a dip the sine never makes; level and spread hardly move
    level = normal + 3.0  # the same shape, shifted: invisible after instance norm
    scale = normal * 4.0
    held = normal[..., ::4].repeat_interleave(4, dim=-1)  # each reading repeated four times
    noisier = normal + 0.3 * torch.randn(normal.shape, generator=torch.Generator().manual_seed(1))
    kinds = [
        ("shape", shape),
        ("level", level),
        ("scale", scale),
        ("held", held),
        ("noisier", noisier),
    ]
    for name, anomalous in kinds:
        scores = fused_model.score(anomalous).score
        assert scores.min() > normal_scores.quantile(0.95), name
    assert (normal_scores >= 0).all()


def test_a_fused_score_reports_each_term_and_is_the_largest(fused_model: AnomalyLLM) -> None:
    windows = torch.cat([sine_windows(4, phase_step=0.53), sine_windows(4) + 3.0])
    scores = fused_model.score(windows)
    assert scores.terms.shape == scores.term_offsets.shape == (8, len(FUSED))
    assert torch.allclose(scores.score, scores.terms.max(dim=1).values.clamp(min=0))
    largest = scores.terms.argmax(dim=1)
    assert torch.equal(scores.peak_offset, scores.term_offsets[torch.arange(8), largest])
    assert (largest[4:] == FUSED.index("level")).all()  # the shifted windows
    assert tiny_model(score_terms=PAPER).eval().score(windows).terms.shape == (8, 0)


def test_the_memory_term_is_the_distance_to_the_nearest_normal_window(
    fused_model: AnomalyLLM,
) -> None:
    bank_window = instance_norm(fused_model.memory[:, 7].unsqueeze(0))  # already normal
    raw = fused_model.raw_terms(bank_window * 2.0 + 5.0).values  # same shape, other level
    memory = raw[FUSED.index("memory")]
    assert float(memory.max()) < 0.02  # 0 but for instance_norm's epsilon


def test_fused_terms_put_the_most_extreme_normal_window_at_one(
    fused_model: AnomalyLLM,
) -> None:
    held_back = sine_windows(100, phase_step=0.41)  # what the fixture calibrated on
    raw = fused_model.raw_terms(held_back).values
    z = (raw - fused_model.term_centre.unsqueeze(1)) / fused_model.term_spread.unsqueeze(1)
    one_sided = [FUSED.index("discrepancy"), FUSED.index("memory")]
    two_sided = [FUSED.index("level"), FUSED.index("scale")]
    # One-sided terms: 0 at their held-back median, 1 at the held-back maximum.
    medians, maxima = z[one_sided].median(dim=1).values, z[one_sided].amax(dim=1)
    assert torch.allclose(medians, torch.zeros_like(medians), atol=1e-4)
    assert torch.allclose(maxima, torch.ones_like(maxima), atol=1e-4)
    # Two-sided terms: every normal window lies within the range, [-1, 1].
    assert float(z[two_sided].abs().max()) <= 1 + 1e-4
    # The point and quiet terms are calibrated on the bank's windows too: at most 1 here.
    assert float(z[[FUSED.index("point"), FUSED.index("quiet")]].max()) <= 1 + 1e-4
    assert fused_model.score(held_back).score.max() <= 1 + 1e-4


def test_the_memory_bank_keeps_within_its_budget() -> None:
    with pytest.raises(ValueError, match="memory"):
        tiny_config(score_terms=FUSED, memory_size=0).validate()
    large = tiny_config(score_terms=FUSED, memory_size=10**6)
    assert large.memory_slots == 8 * 1024 * 1024 // 32
    assert tiny_config(score_terms=PAPER).memory_slots == 0


def test_the_tail_term_is_how_far_the_latest_reading_lies_from_the_rest_of_its_window() -> None:
    model = tiny_model(score_terms=("tail",), tail_readings=1).eval()
    head = torch.tensor([0.0, 1.0] * 15 + [0.0])  # 31 points: mean 15/31
    window = torch.cat([head, torch.tensor([4.0])]).view(1, 1, 32)
    raw = model.raw_terms(window).values
    expected = (4.0 - head.mean()) / head.std(unbiased=False)
    assert float(raw[0, 0, 0]) == pytest.approx(float(expected), rel=1e-4)
    steady = torch.cat([head, torch.tensor([0.0])]).view(1, 1, 32)
    assert float(model.raw_terms(steady).values[0, 0, 0]) < float(raw[0, 0, 0]) / 5


def test_the_tail_term_weighs_each_of_the_newest_tail_readings() -> None:
    # A spike three readings before the end: the newest stride of a window scored every
    # 4 readings holds it, the newest reading alone does not.
    window = torch.tensor([0.0, 1.0] * 16).view(1, 1, 32)
    window[0, 0, -3] = 4.0
    newest_only = tiny_model(score_terms=("tail",), tail_readings=1).eval()
    newest_four = tiny_model(score_terms=("tail",), tail_readings=4).eval()
    head = window[0, 0, :-4]
    expected = float((4.0 - head.mean()) / head.std(unbiased=False))
    assert float(newest_four.raw_terms(window).values[0, 0, 0]) == pytest.approx(expected, rel=1e-4)
    assert float(newest_only.raw_terms(window).values[0, 0, 0]) < expected / 3
    with pytest.raises(ValueError, match="tail_readings"):
        tiny_config(tail_readings=32).validate()


def test_the_point_term_finds_a_spike_among_the_newest_readings_and_where_it_is() -> None:
    model = tiny_model(score_terms=("point",), tail_readings=4).eval()
    window = torch.linspace(0.0, 3.1, 32).view(1, 1, 32)  # a ramp: every residual is 0
    spiked = window.clone()
    spiked[0, 0, -3] += 2.0  # the midpoint of its neighbours is 2.0 below it
    raw = model.raw_terms(torch.cat([window, spiked]))
    assert raw.values[0, 0, 0] == pytest.approx(0.0, abs=1e-5)
    assert raw.values[0, 1, 0] == pytest.approx(2.0, rel=1e-4)
    assert int(raw.offsets[0, 1, 0]) == 29
    # Older than the newest four readings: the window scored four readings earlier saw it.
    early = window.clone()
    early[0, 0, 20] += 2.0
    assert float(model.raw_terms(early).values[0, 0, 0]) < 0.1


def test_the_steps_term_finds_changes_training_never_showed_and_where_they_are() -> None:
    # Windows of 32 readings, the newest 8 compared. A slow sine changes by at most about
    # 0.2 a reading; the same readings run twice as fast change twice as much, although
    # the window's shape, level and spread stay close to normal.
    model = tiny_model(score_terms=("steps",), tail_readings=8, memory_size=64).eval()
    assert model.config.steps_readings() == 8
    normal = sine_windows(200)
    model.calibrate(normal[:150], normal[150:])
    # The bank holds every stretch of evenly spaced windows (the first among them): a
    # stretch of those matches, at another level too.
    assert float(model.raw_terms(normal[:1] + 5.0).values.max()) < 1e-5
    assert model.step_memory.shape == (1, 64, 8)
    # Its squared norms, derived once per bank, follow a bank loaded from a state dict.
    torch.testing.assert_close(model.step_norms, model.step_memory.pow(2).sum(dim=-1))
    loaded = tiny_model(seed=1, score_terms=("steps",), tail_readings=8, memory_size=64)
    loaded.load_state_dict(model.state_dict())
    torch.testing.assert_close(loaded.step_norms, model.step_norms)
    assert "step_norms" not in model.state_dict()  # derived, not saved
    faster = normal[100:101].clone()
    time = torch.arange(8) * 2 * torch.pi / 8
    faster[0, 0, -8:] = torch.sin(time)
    raw = model.raw_terms(torch.cat([normal[120:130], faster]))
    assert float(raw.values[0, -1, 0]) > 3 * float(raw.values[0, :-1, 0].max())
    assert 24 <= int(raw.offsets[0, -1, 0]) < 32  # among the newest 8 readings
    # Older than the newest 8: the window scored 8 readings earlier judged it.
    early = normal[100:101].clone()
    early[0, 0, 8:16] = torch.sin(time)
    assert float(model.raw_terms(early).values.max()) < float(raw.values[0, -1, 0]) / 3
    # At least the newest tail_readings (the stride), so consecutive windows cover all.
    assert tiny_config(score_terms=("steps",), tail_readings=16).steps_readings() == 16
    # A quarter of the window by default ("short_steps": an eighth), another fraction on
    # request, never all of it.
    wide = {"score_terms": ("steps",), "window_length": 256, "tail_readings": 16}
    assert tiny_config(**wide).steps_readings() == 64
    assert tiny_config(**wide).steps_readings("short_steps") == 32
    assert tiny_config(**wide, steps_fraction=8).steps_readings() == 32
    assert tiny_config(**wide, steps_fraction=1).steps_readings() == 255
    with pytest.raises(ValueError, match="steps_fraction"):
        tiny_config(**wide, steps_fraction=0).validate()
    with pytest.raises(ValueError, match="short_steps_fraction"):
        tiny_config(**wide, short_steps_fraction=0).validate()


def test_the_two_steps_terms_keep_banks_of_their_own_lengths_that_a_checkpoint_restores(
    tmp_path: Path,
) -> None:
    terms = ("steps", "short_steps")
    model = tiny_model(score_terms=terms, tail_readings=4, memory_size=64).eval()
    normal = sine_windows(200)
    model.calibrate(normal[:150], normal[150:])
    assert model.step_memory.shape == (1, 64, 8)  # a quarter of 32 readings
    assert model.short_step_memory.shape == (1, 64, 4)  # an eighth
    torch.testing.assert_close(model.short_step_norms, model.short_step_memory.pow(2).sum(dim=-1))
    # A burst in the newest eighth moves both; one just before it only the quarter's.
    time = torch.arange(4) * 2 * torch.pi / 4
    newest, before = normal[100:101].clone(), normal[100:101].clone()
    newest[0, 0, -4:] = torch.sin(time)
    before[0, 0, -9:-5] = torch.sin(time)
    raw = model.raw_terms(torch.cat([normal[100:101], newest, before]))
    quarter, eighth = raw.values[0, :, 0], raw.values[1, :, 0]
    assert float(quarter[1]) > 3 * float(quarter[0]) and float(quarter[2]) > 3 * float(quarter[0])
    assert float(eighth[1]) > 3 * float(eighth[0])
    assert float(eighth[2]) == pytest.approx(float(eighth[0]), abs=1e-4)
    assert 28 <= int(raw.offsets[1, 1, 0]) < 32  # among the newest 4 readings
    path = save_checkpoint(model, tmp_path / "checkpoint")
    loaded = load_checkpoint(path).model
    torch.testing.assert_close(loaded.short_step_memory, model.short_step_memory)
    torch.testing.assert_close(loaded.short_step_norms, model.short_step_norms)
    torch.testing.assert_close(loaded.raw_terms(newest).values, model.raw_terms(newest).values)


def test_a_shape_the_recent_windows_showed_three_times_apart_is_normal_to_the_memory_term(
    fused_model: AnomalyLLM, tmp_path: Path
) -> None:
    assert fused_model.config.recurrence == 3
    novel = sine_windows(1, length=32)
    novel[:, :, 10:14] = 0.0  # a dip training never showed
    memory = FUSED.index("memory")
    before = float(fused_model.raw_terms(novel).values[memory, 0, 0])
    assert before > 0.1
    # Three copies, each overlapping another (places within a window's length): one
    # occurrence, so the shape is still new.
    fused_model.fill_recent(novel.repeat(3, 1, 1), torch.tensor([100.0, 120.0, 131.0]))
    assert float(fused_model.raw_terms(novel).values[memory, 0, 0]) == pytest.approx(before)
    # Two places apart: still fewer than three.
    fused_model.fill_recent(novel.repeat(3, 1, 1), torch.tensor([100.0, 120.0, 200.0]))
    assert float(fused_model.raw_terms(novel).values[memory, 0, 0]) == pytest.approx(before)
    # Three: it recurs, and the term is the distance to the third place's copy (0).
    places = torch.tensor([100.0, 132.0, 120.0, 300.0])
    fused_model.fill_recent(novel.repeat(4, 1, 1), places)
    assert float(fused_model.raw_terms(novel).values[memory, 0, 0]) < 0.02
    # Normal windows keep their distance to training's bank; a checkpoint keeps the bank.
    normal = sine_windows(8, phase_step=0.53)
    loaded = load_checkpoint(save_checkpoint(fused_model, tmp_path / "checkpoint")).model
    torch.testing.assert_close(loaded.recent_place, places.double())
    torch.testing.assert_close(loaded.raw_terms(novel).values, fused_model.raw_terms(novel).values)
    fused_model.fill_recent(novel[:0], torch.zeros(0))
    emptied = fused_model.raw_terms(normal).values
    torch.testing.assert_close(loaded.raw_terms(normal).values, emptied)


def test_calibrating_empties_the_recent_bank_and_recurrence_0_keeps_none(
    fused_model: AnomalyLLM,
) -> None:
    fused_model.fill_recent(sine_windows(5), torch.arange(5) * 100.0)
    assert fused_model.recent_memory.shape == (1, 5, 32)
    fused_model.calibrate(sine_windows(200), sine_windows(100, phase_step=0.41))
    assert fused_model.recent_memory.shape == (1, 0, 32)
    plain = tiny_model(score_terms=FUSED, recurrence=0)
    plain.fill_recent(sine_windows(5), torch.arange(5) * 100.0)
    assert "recent_memory" not in plain.state_dict()


def test_a_score_peaks_where_its_largest_term_lies(fused_model: AnomalyLLM) -> None:
    normal = sine_windows(1)
    spiked = normal.clone()
    spiked[0, 0, -2] += 10.0
    scores = fused_model.score(spiked)
    largest = int(scores.terms[0].argmax())
    assert scores.peak_offset.tolist() == [int(scores.term_offsets[0, largest])]
    assert abs(int(scores.peak_offset[0]) - 30) <= 2  # the point term's 30 or the steps term's
    paper = tiny_model(score_terms=PAPER).eval()  # the teacher-student distance: the centre
    assert paper.score(spiked).peak_offset.tolist() == [16]


def test_each_whole_window_term_says_which_stretch_caused_it(fused_model: AnomalyLLM) -> None:
    def offset(term: str, window: torch.Tensor) -> int:
        raw = fused_model.raw_terms(window)
        return int(raw.offsets[fused_model.config.score_terms.index(term)].item())

    normal = sine_windows(1)
    bumped = normal.clone()
    bumped[0, 0, 20:25] = 3.0  # a shape no normal window has, in readings 20 to 24
    # The memory term blames the whole window's shape: its centre (README, "Candidate
    # terms", stop 37).
    assert offset("memory", bumped) == 16
    shifted = normal.clone()
    shifted[0, 0, 8:] += 3.0  # the level moves up from reading 8 on
    assert offset("level", shifted) >= 8
    shifted[0, 0, 8:] -= 6.0  # and down
    assert offset("level", shifted) >= 8
    burst = normal.clone()
    burst[0, 0, 4:11] *= 5.0  # the amplitude bursts in readings 4 to 10
    assert 2 <= offset("scale", burst) <= 12
    assert offset("scale", normal * 0.01) == 16  # a window too quiet: no stretch, the centre
    smoothed = normal.clone()
    smoothed[0, 0, 18:30] = torch.linspace(float(normal[0, 0, 18]), float(normal[0, 0, 29]), 12)
    assert 18 <= offset("quiet", smoothed) <= 29  # the stretch that lost its grain


def test_the_noise_term_blames_the_noisiest_stretch_of_a_noisier_window() -> None:
    model = tiny_model(score_terms=("memory", "noise", "quiet"), memory_size=64).eval()
    model.calibrate(sine_windows(200), sine_windows(100, phase_step=0.41))
    noisier = sine_windows(1)
    generator = torch.Generator().manual_seed(2)
    noisier[0, 0, 4:30] += 0.5 * torch.randn(26, generator=generator)  # the grain coarsens
    noisier[0, 0, 4:12] += 2.0 * torch.randn(8, generator=generator)  # most in readings 4 to 11
    raw = model.raw_terms(noisier)
    assert model.scaled_terms(raw.values)[1, 0, 0] > 1.0  # the noise term sees it
    assert 4 <= int(raw.offsets[1, 0, 0]) <= 12
    assert int(raw.offsets[2, 0, 0]) > 12  # the quiet term: its finest stretch, elsewhere
    # A model fitted without the noise term still gives it (the ablations ask for it).
    other = tiny_model(score_terms=("memory", "quiet"), memory_size=64).eval()
    assert other.raw_terms(noisier, ("noise",)).values.shape == (1, 1, 1)


def test_the_quiet_term_sees_a_signal_that_lost_its_grain_where_shape_level_and_spread_do_not(
    fused_model: AnomalyLLM,
) -> None:
    normal = sine_windows(50, phase_step=0.53)
    # A transmitter that repeats each reading four times (a gateway filling gaps with the
    # last value): the sine keeps its shape, level and spread, and loses its grain.
    held = normal[..., ::4].repeat_interleave(4, dim=-1)
    raw = fused_model.raw_terms(normal).values[FUSED.index("quiet")]
    grain = normal.diff(n=2, dim=-1).abs().median(dim=-1).values
    assert torch.allclose(raw, -torch.log(grain + 1e-5))
    scores = fused_model.score(held)
    quiet = scores.terms[:, FUSED.index("quiet")]
    assert quiet.min() > 1.0  # beyond every normal window
    others = [row for row, name in enumerate(FUSED) if name != "quiet"]
    assert scores.terms[:, others].max() < quiet.min()
    assert torch.equal(scores.score, quiet)


def test_the_quiet_term_counts_only_grain_lost_and_the_noise_term_both_ways() -> None:
    model = tiny_model(score_terms=("memory", "noise", "quiet"), memory_size=64).eval()
    model.calibrate(sine_windows(200), sine_windows(100, phase_step=0.41))
    normal = sine_windows(50, phase_step=0.53)
    grain = normal.diff(n=2, dim=-1).abs().median(dim=-1).values
    raw = model.raw_terms(normal).values
    assert torch.allclose(raw[1], -raw[2])  # the same grain, the other way up
    assert torch.allclose(raw[2], -torch.log(grain + 1e-5))
    held = normal[..., ::4].repeat_interleave(4, dim=-1)  # each reading repeated 4 times
    noisier = normal + 0.3 * torch.randn(normal.shape, generator=torch.Generator().manual_seed(1))
    noise, quiet = 1, 2
    assert model.score(held).terms[:, [noise, quiet]].min() > 1.0  # both see it
    louder = model.score(noisier).terms
    assert louder[:, noise].min() > 1.0
    assert louder[:, quiet].max() < 0.0  # more grain than normal: below its median
    # One-sided, as the point term: 0 at the normal windows' median, 1 at their largest.
    z = model.score(sine_windows(100, phase_step=0.41)).terms[:, quiet]
    assert float(z.max()) <= 1 + 1e-4


def test_a_newest_spike_raises_the_score_of_a_model_with_the_tail_term() -> None:
    model = tiny_model(score_terms=("discrepancy", "tail"), memory_size=64).eval()
    model.calibrate(sine_windows(200), sine_windows(100, phase_step=0.41))
    normal = sine_windows(50, phase_step=0.53)
    spiked = normal.clone()
    spiked[:, :, -1] += 2.0  # the newest reading jumps; the rest of the window is normal
    assert model.score(spiked).score.min() > model.score(normal).score.max()


def test_a_term_that_hardly_varied_in_training_still_has_a_unit_of_its_sampling_error() -> None:
    # Whole periods of a clean sine: every window has the same mean and spread, so their
    # normal range is ~0 wide. A unit of that range would make a hair of drift an alarm.
    length = 32
    time = torch.arange(length) * 2 * torch.pi / 16
    phases = torch.arange(300).unsqueeze(1) * 0.37
    clean = torch.sin(time + phases).unsqueeze(1)  # (300, 1, 32), two full periods each
    model = tiny_model(score_terms=("level", "scale")).eval()
    model.calibrate(clean[:200], clean[200:])
    sigma = float(clean.std(unbiased=False))
    level, scale = model.term_spread[:, 0].tolist()
    assert level == pytest.approx(3 * sigma / length**0.5, rel=1e-3)
    assert scale == pytest.approx(3 / (2 * length) ** 0.5, rel=1e-3)
    drifted = clean[:10] + 0.01  # far inside one sampling error of a window mean
    assert float(model.score(drifted).score.max()) < 1.0
    shifted = clean[:10] + 3 * sigma  # a real level shift: sqrt(L) units
    assert model.score(shifted).score.tolist() == pytest.approx([length**0.5] * 10, rel=1e-3)


def test_the_level_units_floor_in_sigmas_makes_a_level_change_count_in_spreads() -> None:
    # A noisy sine whose window means hardly vary: their range is a sliver of the spread.
    generator = torch.Generator().manual_seed(0)
    time = torch.arange(32) * 2 * torch.pi / 16
    phases = torch.arange(300).unsqueeze(1) * 0.37
    noisy = torch.sin(time + phases) + 0.3 * torch.randn(300, 32, generator=generator)
    noisy = noisy.unsqueeze(1)  # (300, 1, 32)
    sigma = float(noisy[:200].std(unbiased=False))
    units = {}
    for sigmas in (0.0, 2.0):
        model = tiny_model(score_terms=("level",), level_unit_sigmas=sigmas).eval()
        model.calibrate(noisy[:200], noisy[200:])
        units[sigmas] = float(model.term_spread[0, 0])
    assert units[2.0] == pytest.approx(2 * sigma, rel=1e-3)
    assert units[0.0] < units[2.0] / 3  # the range of window means, or its sampling error
    shifted = noisy[200:210] + 4 * sigma  # a shift of four spreads: two units
    assert model.score(shifted).score.min() > 1.5


def test_the_level_unit_in_sigmas_must_be_finite_and_not_negative() -> None:
    for sigmas in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="level_unit_sigmas"):
            ModelConfig(level_unit_sigmas=sigmas).validate()


def test_a_channel_that_never_varied_still_alarms_when_it_moves() -> None:
    model = tiny_model(score_terms=("level", "scale")).eval()
    flat = torch.full((100, 1, 32), 2.0)
    model.calibrate(flat[:80], flat[80:])
    moved = flat[:1].clone()
    moved[..., -4:] = 2.5
    assert float(model.score(moved).score) > 10.0
    assert float(model.score(flat[:1]).score) == 0.0


@pytest.mark.parametrize("size", [5, 128, 300, 1024])
def test_the_blockwise_argmax_is_torchs(size: int) -> None:
    values = torch.randn(3, 2, size, generator=torch.Generator().manual_seed(size))
    values[0, 0, size // 2] = values[0, 0, 0] = 10.0  # a tie: the first, as torch's
    assert torch.equal(_argmax_last(values), values.argmax(dim=-1))


def test_the_first_load_of_a_backbone_leaves_the_random_state_a_cached_load_leaves(
    tmp_path: Path,
) -> None:
    """`trainer fit` on a machine whose backbone cache is empty trains the model it trains
    anywhere else: the layers built after the backbone start from the same random state."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(TINY_LLAMA)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    original = tmp_path / "tiny-lm"
    AutoModelForCausalLM.from_config(config).save_pretrained(original)
    loads = []
    for _ in range(2):  # the cache is empty, then filled
        torch.manual_seed(0)
        base, _ = load_backbone(str(original), 1, cache_dir=tmp_path / "cache")
        loads.append((torch.rand(4), base.state_dict()))
    (first_draws, first_weights), (cached_draws, cached_weights) = loads
    assert torch.equal(first_draws, cached_draws)
    for name, weight in first_weights.items():
        assert torch.equal(weight, cached_weights[name]), name
