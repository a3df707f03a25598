"""The synthetic "sounding shapes" scene (av2ts_cli/data/scene.py): labels, audio cues, determinism, the clip
writer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from av2ts_cli.classes import AVSS_CLASSES, S4_CATEGORIES
from av2ts_cli.data.scene import CATEGORIES, Scene, sample_times, write_video_clip
from av2ts_cli.model.audio import waveform_to_examples


def test_categories_are_distinct_and_name_real_classes():
    assert len({c.shape for c in CATEGORIES}) == len({c.colour for c in CATEGORIES}) == len(CATEGORIES)
    assert len({c.sound for c in CATEGORIES}) == len(CATEGORIES)
    for category in CATEGORIES:
        assert category.s4_category in S4_CATEGORIES and category.avss_class in AVSS_CLASSES


@pytest.mark.parametrize("kind", ["s4", "ms3", "v2"])
def test_scene_labels_hold_exactly_the_sounding_objects(kind):
    scene = Scene.random(np.random.default_rng(3), kind)
    assert scene.duration == (10 if kind == "v2" else 5)
    assert len({obj.category for obj in scene.objects}) == len(scene.objects) >= 2  # different categories
    for t in sample_times(scene.duration):
        rgb, labels = scene.render(t, 96)
        assert rgb.dtype == np.uint8 and rgb.shape == (96, 96, 3) and labels.shape == (96, 96)
        sounding = {CATEGORIES[scene.objects[i].category].avss_index for i in scene.sounding_at(t)}
        assert sounding, "every second has a sounding object"
        instances = scene.instance_map(t, 96)
        for i, obj in enumerate(scene.objects):
            visible = instances == i + 1
            expected = CATEGORIES[obj.category].avss_index if i in scene.sounding_at(t) else 0
            assert np.all(labels[visible] == expected)
        assert np.all(labels[instances == 0] == 0)
        assert set(np.unique(labels)) - {0} <= sounding


def test_single_source_scenes_have_one_category_sounding_throughout():
    for seed in range(20):
        scene = Scene.random(np.random.default_rng(seed), "s4")
        sounding = [scene.sounding_at(t) for t in range(scene.duration)]
        assert all(s == sounding[0] for s in sounding) and len(sounding[0]) == 1
        assert len(scene.objects) - 1 >= 1  # at least one silent distractor


def test_without_audio_the_task_is_at_most_about_half_solvable():
    """The sounding category is drawn independently of how the shapes look, so an audio-blind model can at best
    segment every shape or guess one: both stay near half the IoU an audio-aware model reaches (~1)."""
    for kind, limit in (("s4", 0.6), ("ms3", 0.6)):
        all_shapes, one_shape = [], []
        for seed in range(40):
            scene = Scene.random(np.random.default_rng(seed), kind)
            for t in sample_times(scene.duration):
                _, labels = scene.render(t, 48)
                instances = scene.instance_map(t, 48)
                truth = labels > 0
                guess = instances == 1 + int(np.random.default_rng(seed).integers(len(scene.objects)))
                all_shapes.append((truth & (instances > 0)).sum() / max((truth | (instances > 0)).sum(), 1))
                one_shape.append((truth & guess).sum() / max((truth | guess).sum(), 1))
        assert np.mean(all_shapes) < limit and np.mean(one_shape) < limit, (kind, np.mean(all_shapes),
                                                                            np.mean(one_shape))


def test_each_category_sounds_distinct_after_the_log_mel():
    """Nearest-centroid on the mean log-mel of 0.96 s examples tells the categories apart across instances."""
    features = {k: [] for k in range(len(CATEGORIES))}
    for seed in range(36):
        scene = Scene.random(np.random.default_rng(seed), "s4", duration=2)
        category = scene.objects[scene.sounding_at(0)[0]].category
        examples = waveform_to_examples(torch.from_numpy(scene.audio(16000)))
        features[category] += [e.mean(0).numpy() for e in examples]
    assert all(len(v) >= 4 for v in features.values()), {k: len(v) for k, v in features.items()}
    centroids = np.stack([np.mean(v[::2], axis=0) for v in features.values()])
    correct = total = 0
    for category, rows in features.items():
        for row in rows[1::2]:  # held-out instances
            correct += int(np.argmin(((centroids - row) ** 2).sum(1)) == category)
            total += 1
    assert correct / total >= 0.9


def test_scene_is_a_deterministic_function_of_the_generator():
    a = Scene.random(np.random.default_rng(7), "ms3")
    b = Scene.random(np.random.default_rng(7), "ms3")
    assert np.array_equal(a.render(1.3, 64)[0], b.render(1.3, 64)[0])
    assert np.array_equal(a.audio(), b.audio())
    wave = a.audio(16000)
    assert wave.dtype == np.float32 and wave.shape == (5 * 16000,) and np.abs(wave).max() <= 1.0
    moved = a.render(1.34, 64)[0]
    assert 0 < np.abs(moved.astype(int) - a.render(1.3, 64)[0]).mean() < 20  # smooth motion: changes, a little


def test_write_video_clip_returns_the_masks_at_sample_times(tmp_path):
    from av2ts_cli import media

    scene = Scene.random(np.random.default_rng(1), "ms3", duration=3)
    truth = write_video_clip(scene, tmp_path / "clip.mp4", fps=25, size=64)
    info = media.probe(truth.path)
    assert info.has_audio and (info.width, info.height) == (64, 64) and info.duration >= 2.95
    assert truth.times == (0.9375, 1.9375, 2.9375) and truth.frame_indices == (23, 48, 73)
    shown = media.decode_frames_at(truth.path, truth.times)
    for i, index in enumerate(truth.frame_indices):
        rgb, labels = scene.render(index / 25, 64)
        assert np.array_equal(truth.labels[i], labels)
        assert np.abs(shown[i].astype(int) - rgb).mean() < 8  # the frame the video shows then (H.264 is lossy)
    assert truth.masks.dtype == bool and truth.masks.shape == (3, 64, 64)
