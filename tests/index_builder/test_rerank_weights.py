"""The reranker's two training splits weigh what rerank_temporal_share says, whatever their sizes."""

import numpy as np
import pytest

from index_builder.config import BuildConfig
from index_builder.rerank_train import split_weights


def test_the_temporal_split_gets_its_share_of_the_weight():
    cfg = BuildConfig(rerank_temporal_share=0.5)
    w = split_weights([200, 800], ("temporal", "last_n"), cfg)
    assert w.shape == (1000,) and w.mean() == pytest.approx(1.0)
    assert w[:200].sum() == pytest.approx(w[200:].sum())  # 200 temporal queries weigh as much as 800
    w = split_weights([200, 800], ("temporal", "last_n"), BuildConfig(rerank_temporal_share=0.8))
    assert w[:200].sum() / w.sum() == pytest.approx(0.8)
    assert np.all(w[:200] == w[0]) and np.all(w[200:] == w[200])


def test_a_single_split_is_not_weighted():
    assert split_weights([300], ("temporal",), BuildConfig()) is None
    assert split_weights([0, 500], ("temporal", "last_n"), BuildConfig()) is None


def test_shares_outside_the_open_interval_are_refused():
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="rerank_temporal_share"):
            BuildConfig(rerank_temporal_share=bad).validate()
