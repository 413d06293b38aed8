"""Types of the compiled kernels in _rows.pyx (layer 3: inputs already validated by ranking.kernels.rows)."""

import numpy as np
import numpy.typing as npt

def unique_in_order(rows: npt.NDArray[np.int32], mark: npt.NDArray[np.uint8], out: npt.NDArray[np.int32]) -> int: ...
def sum_rows(
    indptr: npt.NDArray[np.int64],
    indices: npt.NDArray[np.int32],
    values: npt.NDArray[np.float32],
    sources: npt.NDArray[np.int32],
    weights: npt.NDArray[np.float32],
    slot: npt.NDArray[np.int32],
    grow: bool,
    out: npt.NDArray[np.float64],
    items: npt.NDArray[np.int32],
    n: int,
) -> int: ...
def max_share(
    indptr: npt.NDArray[np.int64],
    indices: npt.NDArray[np.int32],
    rows: npt.NDArray[np.int32],
    share: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
) -> int: ...
def row_bounds(rows: npt.NDArray[np.int32] | npt.NDArray[np.int64]) -> tuple[int, int]: ...
def sorted_row(codes: npt.NDArray[np.uint32], order: npt.NDArray[np.int32], key: str) -> int: ...
