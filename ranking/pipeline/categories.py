"""Category membership of candidate rows: the walk the request's filters and the rules share."""

from __future__ import annotations

import numpy as np

from ranking.bundle.model import RankingModel
from ranking.kernels.rows import max_share


def in_categories(model: RankingModel, rows: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """For each item row, whether it belongs to any of ``categories`` (category ids).

    One compiled walk over the rows' categories (:func:`ranking.kernels.rows.max_share` of a 0/1
    membership), the walk the category-affinity feature uses.
    """
    if len(rows) == 0 or len(categories) == 0:
        return np.zeros(len(rows), dtype=bool)
    member = np.zeros(len(model.category_names), np.float32)
    member[np.asarray(categories)] = 1.0
    return max_share(model.item_categories, rows, member) > 0
