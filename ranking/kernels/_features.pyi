"""Types of the compiled feature kernel in _features.pyx (inputs validated by ranking.kernels.features)."""

import numpy as np
import numpy.typing as npt

COLUMNS: tuple[str, ...]
NO_MEMORY: int

class FeatureKernel:
    item_table: npt.NDArray[np.float32]
    n_items: int
    n_users: int
    n_categories: int
    n_segments: int
    data_end: int
    has_ease: bool
    def __init__(self, t: dict[str, np.ndarray], n_categories: int, data_end: int) -> None: ...
    def candidates(
        self,
        pool: npt.NDArray[np.int32],
        seg: int,
        n_seg: int,
        n_popular: int,
        source_user: int,
        session: npt.NDArray[np.int32],
        n_again: int,
        t: int,
        p_rows: npt.NDArray[np.int32],
        p_times: npt.NDArray[np.int64],
        n_covis: int,
        n_recent_popular: int,
        n_ease: int,
        mask_user: int,
        exclude: npt.NDArray[np.int32],
        category_codes: npt.NDArray[np.uint32],
        include_bits: int,
        min_price: float,
        max_price: float,
        slot: npt.NDArray[np.int32],
        mark: npt.NDArray[np.uint8],
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.bool_]]: ...
    def fill_score(
        self,
        X: npt.NDArray[np.float32],
        cands: npt.NDArray[np.int32],
        slot: npt.NDArray[np.int32],
        mark: npt.NDArray[np.uint8],
        work: npt.NDArray[np.float64],
        weights: npt.NDArray[np.float32],
        rung: int,
        urow: int,
        seg: int,
        t: int,
        t_pop: int,
        at_end: bool,
        block: int,
        weekday: int,
        qvec: npt.NDArray[np.float32],
        session: npt.NDArray[np.int32],
        ctx_cols: npt.NDArray[np.int32],
        p_rows: npt.NDArray[np.int32],
        p_times: npt.NDArray[np.int64],
        roots_first: npt.NDArray[np.int32],
        roots_second: npt.NDArray[np.int32],
        feature: npt.NDArray[np.int32],
        threshold: npt.NDArray[np.float64],
        left: npt.NDArray[np.int32],
        right: npt.NDArray[np.int32],
        flags: npt.NDArray[np.uint8],
        leaf_value: npt.NDArray[np.float64],
        mask: npt.NDArray[np.uint8],
        offsets: npt.NDArray[np.float32],
        n_second: int,
        deadline_ns: int,
        check_every: int,
        first_acc: npt.NDArray[np.float64],
        first_scores: npt.NDArray[np.float32],
        first_indices: npt.NDArray[np.int32],
        out_scores: npt.NDArray[np.float32],
        out_indices: npt.NDArray[np.int32],
    ) -> tuple[int, int, int, int, int, int]: ...
