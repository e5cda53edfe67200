"""The example store: what is written reads back, nothing partial is published."""

import numpy as np
import pytest

from gkd_cli.data.store import ExampleStore, ExampleStoreWriter, store_paths

pytestmark = pytest.mark.unit


def test_roundtrip_with_and_without_mask(tmp_path):
    rng = np.random.default_rng(0)
    examples = [rng.integers(0, 70000, size=n) for n in (1, 5, 17)]
    masks = [None, np.array([0, 0, 1, 1, 1]), rng.integers(0, 2, size=17)]
    w = ExampleStoreWriter(tmp_path, "s", vocab_size=70000)
    for ids, m in zip(examples, masks, strict=True):
        w.add(ids, m)
    store = w.finish({"source": "test"})
    assert len(store) == 3 and store.num_tokens == 23 and store.has_mask
    assert store.tokens(0).dtype == np.uint32
    for i, (ids, m) in enumerate(zip(examples, masks, strict=True)):
        np.testing.assert_array_equal(store.tokens(i), ids)
        np.testing.assert_array_equal(store.mask(i), np.ones(len(ids)) if m is None else m)
    assert store.meta == {"source": "test"}
    reopened = ExampleStore.open(tmp_path, "s")
    np.testing.assert_array_equal(reopened.lengths(), [1, 5, 17])


def test_unmasked_store_has_no_mask_file_and_small_dtype(tmp_path):
    w = ExampleStoreWriter(tmp_path, "s", vocab_size=100)
    w.add([1, 2, 3])
    store = w.finish()
    assert not store.has_mask and not store_paths(tmp_path, "s")["mask"].exists()
    assert store.tokens(0).dtype == np.uint16
    np.testing.assert_array_equal(store.mask(0), [1, 1, 1])


@pytest.mark.parametrize(
    ("tokens", "mask", "message"),
    [
        ([], None, "non-empty"),
        ([5, 100], None, "outside the vocabulary"),
        ([1, 2], [1], "mask has"),
    ],
)
def test_bad_examples_are_refused(tmp_path, tokens, mask, message):
    w = ExampleStoreWriter(tmp_path, "s", vocab_size=100)
    with pytest.raises(ValueError, match=message):
        w.add(tokens, mask)
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_empty_or_aborted_store_publishes_nothing(tmp_path):
    w = ExampleStoreWriter(tmp_path, "s", vocab_size=100)
    with pytest.raises(ValueError, match="no examples"):
        w.finish()
    assert list(tmp_path.iterdir()) == []
    assert not ExampleStore.exists(tmp_path, "s")
