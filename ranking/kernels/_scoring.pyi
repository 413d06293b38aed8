"""Types of the compiled kernels in _scoring.pyx (layer 3: inputs already validated).

Arrays are C-contiguous: float32 features/scores, int32 indices, uint8 masks, float64
tree values; out_* arguments are written in place.
"""

import numpy as np
import numpy.typing as npt

def score_topk(
    features: npt.NDArray[np.float32],
    weights: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
    offsets: npt.NDArray[np.float32],
    bias: float,
    deadline_ns: int,
    check_every: int,
    out_scores: npt.NDArray[np.float32],
    out_indices: npt.NDArray[np.int32],
) -> tuple[int, int]: ...
def topk(
    scores: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
    out_scores: npt.NDArray[np.float32],
    out_indices: npt.NDArray[np.int32],
) -> int: ...
def tree_contributions(
    features: npt.NDArray[np.float32],
    roots: npt.NDArray[np.int32],
    feature: npt.NDArray[np.int32],
    threshold: npt.NDArray[np.float64],
    left: npt.NDArray[np.int32],
    right: npt.NDArray[np.int32],
    flags: npt.NDArray[np.uint8],
    node_value: npt.NDArray[np.float64],
    leaf_value: npt.NDArray[np.float64],
    out_contrib: npt.NDArray[np.float64],
    out_bias: npt.NDArray[np.float64],
) -> None: ...
def score_trees_call(
    features: npt.NDArray[np.float32],
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
) -> tuple[int, int, int, int]: ...
