"""Label-free augmentation of the train rows (selfxit.fit.augment): the config and its errors, what mixup, cutmix and
colour jitter make, determinism, and what the recorder stores (train rows only, the backbone's softmax on each copy)."""
import argparse

import numpy as np
import pytest
import torch
from backbones import scrambled_resnet20

from selfxit.cli.common import augment_value
from selfxit.fit.augment import AugmentConfig, AugmentConfigError, _partner, augment, augmented_copies
from selfxit.fit.medial import SPLITS
from selfxit.fit.record import assign_splits, record
from selfxit.ops.ray_jobs import augment_states


def _constant_rows(n: int, size: int = 8) -> torch.Tensor:
    """Row i is the constant image i + 1: flips and shifts keep it, so what a copy mixed is readable."""
    return (torch.arange(n, dtype=torch.float32) + 1).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()


# ---- the config -----------------------------------------------------------------------------------------------

def test_an_int_is_flip_shift_copies_and_a_mapping_gives_every_key():
    assert AugmentConfig.coerce(2) == AugmentConfig() == AugmentConfig(copies=2, mixup=0, cutmix=0, jitter=0.0)
    assert AugmentConfig.coerce(0).rows_per_train_sample == 0
    config = AugmentConfig.coerce({"copies": 1, "mixup": 2, "cutmix": 1, "jitter": 0.3})
    assert config.rows_per_train_sample == 4 and AugmentConfig.coerce(config) is config
    assert AugmentConfig.coerce(config.to_dict()) == config  # 1:1 onto plain (YAML) data


@pytest.mark.parametrize("value, words", [
    ({"mixup": -1}, "mixup must be an int in [0, 16]"),
    ({"cutmix": 1.5}, "cutmix must be an int"),
    ({"copies": True}, "copies must be an int"),
    ({"jitter": 1.0}, "jitter must be a number in [0, 1)"),
    ({"jitter": "strong"}, "jitter must be a number"),
    ({"mix": 1}, "unknown keys ['mix']; allowed: ['copies', 'mixup', 'cutmix', 'jitter']"),
    ("2", "a number of flip/shift copies or a mapping"),
    (None, "a number of flip/shift copies or a mapping"),
])
def test_bad_settings_are_refused_naming_the_key(value, words):
    with pytest.raises(AugmentConfigError) as info:
        AugmentConfig.coerce(value)
    assert words in str(info.value)


def test_cutmix_and_jitter_need_images():
    tokens = torch.randn(4, 5, 8)
    with pytest.raises(AugmentConfigError, match=r"need image batches \(N, C, H, W\); got inputs of shape \(4, 5, 8\)"):
        next(augmented_copies(tokens, torch.Generator().manual_seed(0), AugmentConfig(copies=0, cutmix=1)))
    mixed, is_mixed = next(augmented_copies(tokens, torch.Generator().manual_seed(0), AugmentConfig(copies=0, mixup=1)))
    assert mixed.shape == tokens.shape and is_mixed  # mixup needs no image


def test_command_line_value_is_a_number_or_a_yaml_mapping():
    assert augment_value("3") == 3
    assert augment_value("{copies: 1, mixup: 2, jitter: 0.2}") == {"copies": 1, "mixup": 2, "jitter": 0.2}
    for bad in ("true", "mixup", "[1, 2]", "{a: [1"):
        with pytest.raises(argparse.ArgumentTypeError):
            augment_value(bad)


# ---- what the copies are ---------------------------------------------------------------------------------------

def test_default_copies_are_the_flip_shift_copies_of_before_draw_for_draw():
    """augment_copies=2 records exactly what it always did: two augment() calls on one generator, nothing else."""
    x = torch.randn(7, 3, 12, 12)
    old, new = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    expected = [augment(x, old), augment(x, old)]
    got = list(augmented_copies(x, new, AugmentConfig()))
    assert len(got) == 2 and all(torch.equal(a, b) and not mixed for a, (b, mixed) in zip(expected, got))
    assert torch.equal(old.get_state(), new.get_state())


def test_mixup_rows_blend_two_different_train_rows():
    x = _constant_rows(6)
    (mixed, is_mixed), = augmented_copies(x, torch.Generator().manual_seed(0), AugmentConfig(copies=0, mixup=1))
    assert is_mixed
    values = mixed.flatten(1)
    assert torch.allclose(values, values[:, :1].expand_as(values))  # a blend of two constant images is constant
    for i, v in enumerate(values[:, 0].tolist()):  # lam (i + 1) + (1 - lam) (p + 1) with p != i, lam in [0, 1)
        assert any(p != i and min(i, p) + 1 - 1e-5 <= v <= max(i, p) + 1 + 1e-5 for p in range(6)), (i, v)
    assert not torch.allclose(mixed, x)
    # The partners are the other rows in one cycle: every row is some other row's partner exactly once.
    generator = torch.Generator().manual_seed(0)
    augment(x, generator)
    partner = _partner(6, generator)
    assert sorted(partner.tolist()) == list(range(6)) and all(p != i for i, p in enumerate(partner.tolist()))
    lam = torch.rand(6, generator=generator)
    assert torch.allclose(values[:, 0], lam * (torch.arange(6) + 1) + (1 - lam) * (partner + 1).float())


def test_cutmix_rows_paste_a_box_of_one_other_train_row():
    x = _constant_rows(5, size=16)
    (cut, is_mixed), = augmented_copies(x, torch.Generator().manual_seed(1), AugmentConfig(copies=0, cutmix=1))
    assert is_mixed and cut.shape == x.shape
    pasted = 0
    for i in range(5):
        present = set(torch.unique(cut[i]).tolist())
        assert present <= {float(p + 1) for p in range(5)} and len(present) <= 2  # itself and at most one partner
        others = present - {float(i + 1)}
        if others:
            pasted += 1
            inside = cut[i, 0] == others.pop()
            rows, cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
            assert inside[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one rectangle
    assert pasted >= 3


def test_jitter_changes_colour_but_keeps_the_copies_otherwise():
    x = torch.rand(8, 3, 10, 10)
    plain = list(augmented_copies(x, torch.Generator().manual_seed(2), AugmentConfig(copies=1)))[0][0]
    jittered = list(augmented_copies(x, torch.Generator().manual_seed(2), AugmentConfig(copies=1, jitter=0.4)))[0][0]
    assert not torch.allclose(plain, jittered)
    # The flip/shift are the same draws (jitter draws after them): per image, jitter is a per-channel affine map
    # of the same pixels, so the pixels' ranks within a channel are kept up to the saturation blend.
    corr = [torch.corrcoef(torch.stack([plain[i].flatten(), jittered[i].flatten()]))[0, 1] for i in range(8)]
    assert min(corr) > 0.8


def test_copies_are_seeded_and_their_draws_depend_only_on_the_row_count():
    config = AugmentConfig(copies=1, mixup=1, cutmix=2, jitter=0.3)
    x = torch.randn(9, 3, 16, 16)
    one = [c for c, _ in augmented_copies(x, torch.Generator().manual_seed(3), config)]
    two = [c for c, _ in augmented_copies(x, torch.Generator().manual_seed(3), config)]
    other = [c for c, _ in augmented_copies(x, torch.Generator().manual_seed(4), config)]
    assert len(one) == 4 and all(torch.equal(a, b) for a, b in zip(one, two))
    assert not any(torch.equal(a, b) for a, b in zip(one, other))
    # What the Ray recorder replays for earlier chunks (zeros of another size) leaves the generator where real
    # images do.
    real, blank = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in augmented_copies(x, real, config):
        pass
    for _ in augmented_copies(torch.zeros(9, 3, 9, 9), blank, config):
        pass
    assert torch.equal(real.get_state(), blank.get_state())


def test_ray_chunk_states_follow_the_single_process_generator_under_mixup():
    split = assign_splits(300, 0)
    config = AugmentConfig(copies=1, mixup=1, cutmix=1, jitter=0.2)
    states = augment_states(split, 0, config)
    generator = torch.Generator().manual_seed(0)
    for k, (start, state) in enumerate(states):
        assert start == 128 * k and np.array_equal(state, generator.get_state().numpy())
        train = int((split[start:start + 128] == SPLITS["train"]).sum())
        for _ in augmented_copies(torch.randn(train, 3, 32, 32), generator, config):
            pass
    assert not np.array_equal(states[1][1], augment_states(split, 0, 2)[1][1])  # the mixed copies draw more


# ---- what the recorder stores -----------------------------------------------------------------------------------

def test_recorded_mixed_rows_are_train_only_with_the_backbones_softmax_as_target(tmp_path):
    model = scrambled_resnet20()
    n, batch, seed = 48, 16, 3
    x = torch.randn(n, 3, 32, 32)
    labels = torch.arange(n) % 10
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=batch)
    config = AugmentConfig(copies=1, mixup=1, cutmix=1, jitter=0.2)
    ds = record(model, ["layer1"], [(16, 32, 32)], 10, loader, n, tmp_path / "m", seed=seed,
                augment_copies=config.to_dict(), progress=False, heads="full")
    split = assign_splits(n, seed)
    train = split == SPLITS["train"]
    assert ds.meta.num_samples == n + 3 * int(train.sum())
    sources, counts = np.unique(ds.source, return_counts=True)
    np.testing.assert_array_equal(sources, np.arange(n))
    np.testing.assert_array_equal(counts, np.where(train, 4, 1))  # tune/val/test rows: their clean row only
    np.testing.assert_array_equal(ds.split, split[ds.source])
    # Replay the first batch: its clean rows, then each copy of its train rows, in the config's order.
    generator = torch.Generator().manual_seed(seed)
    batch_train = np.flatnonzero(train[:batch])
    row = batch
    with torch.no_grad():
        for copy, mixed in augmented_copies(x[torch.from_numpy(batch_train)], generator, config):
            rows = np.arange(row, row + len(batch_train))
            np.testing.assert_array_equal(ds.source[rows], batch_train)
            assert torch.allclose(ds.teacher(rows), model(copy).softmax(1), atol=1e-5)  # the backbone's own label
            np.testing.assert_array_equal(ds.labels[rows], -1 if mixed else labels[batch_train].numpy())
            row += len(batch_train)
    again = record(model, ["layer1"], [(16, 32, 32)], 10, loader, n, tmp_path / "again", seed=seed,
                   augment_copies=config, progress=False, heads="full")
    np.testing.assert_array_equal(again.probs, ds.probs)  # deterministic under the seed
