import numpy as np
import pytest

from simclr_tf.data import subsets


def _labels():
    # Unequal classes: 100, 40, 7 and 1 examples, interleaved.
    counts = {0: 100, 1: 40, 2: 7, 3: 1}
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    return np.random.default_rng(0).permutation(labels), counts


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_subset_is_class_balanced(fraction):
    labels, counts = _labels()
    idx = subsets.class_balanced_subset(labels, fraction, seed=3)
    assert np.all(np.diff(idx) > 0)  # sorted, no repeats
    kept = np.bincount(labels[idx], minlength=4)
    # Hand-computed: max(1, round(fraction * n_c)).
    want = [max(1, round(fraction * n)) for n in counts.values()]
    np.testing.assert_array_equal(kept, want)


def test_subset_is_deterministic_per_seed():
    labels, _ = _labels()
    a = subsets.class_balanced_subset(labels, 0.1, seed=1)
    b = subsets.class_balanced_subset(labels, 0.1, seed=1)
    c = subsets.class_balanced_subset(labels, 0.1, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_subset_of_one_class_does_not_depend_on_others():
    labels, _ = _labels()
    full = subsets.class_balanced_subset(labels, 0.1, seed=4)
    only0 = np.flatnonzero(labels == 0)
    alone = subsets.class_balanced_subset(labels[only0], 0.1, seed=4)
    np.testing.assert_array_equal(full[labels[full] == 0], only0[alone])


def test_whole_fraction_keeps_everything():
    labels, _ = _labels()
    idx = subsets.class_balanced_subset(labels, 1.0, seed=0)
    np.testing.assert_array_equal(idx, np.arange(labels.size))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError, match="label_fraction"):
        subsets.class_balanced_subset(np.array([0, 1]), fraction, seed=0)
