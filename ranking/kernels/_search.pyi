"""Types of the compiled kernel in _search.pyx (layer 3: inputs already validated by ranking.kernels.search)."""

import numpy as np
import numpy.typing as npt

def top_inner(
    items: npt.NDArray[np.float32],
    queries: npt.NDArray[np.float32],
    scores: npt.NDArray[np.float32],
    positions: npt.NDArray[np.int32],
) -> None: ...
def top_inner_two_pass(
    items: npt.NDArray[np.float32],
    half: npt.NDArray[np.uint16],
    err: npt.NDArray[np.float64],
    norm_bound: float,
    queries: npt.NDArray[np.float32],
    scores: npt.NDArray[np.float32],
    positions: npt.NDArray[np.int32],
) -> int: ...
def norms(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]: ...
def use_avx2(on: bool) -> bool: ...
