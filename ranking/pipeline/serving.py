"""What serving computes from one loaded bundle: the scorer, the exact-search heads, the scratch."""

from __future__ import annotations

from ranking.bundle.model import RankingModel
from ranking.errors import BundleError
from ranking.kernels.features import FeatureKernel
from ranking.kernels.reranker import LinearScorer, TreeScorer, load_scorer
from ranking.kernels.rows import ItemScratch
from ranking.retrieval.search import ExactHead


class ServingModel:
    """A bundle made ready to serve: the data (:class:`RankingModel`) and what is built from it.

    The server's supervisor builds it before forking (server.workers), so the workers
    share the scorer's arrays, the exact heads and the scratch pool copy-on-write like
    the index; every :class:`~ranking.pipeline.ranker.Ranker` built on it shares them too.

    Parameters
    ----------
    model : RankingModel
        The loaded bundle; never mutated.

    Raises
    ------
    BundleError
        The bundle's scoring model is of a kind this code does not apply.
    """

    def __init__(self, model: RankingModel):
        self.model = model
        # Linear (older bundles) or the learned tree ensemble; anything else is refused here.
        self.scorer: TreeScorer | LinearScorer = load_scorer(model.bundle)
        self.feature_names: list[str] = list(self.scorer.feature_names)
        # Dense per-request scratch over the item rows (positions, visited marks).
        self.scratch = ItemScratch(model.n_items)
        self._heads: dict[int, ExactHead] = {}
        self._features: FeatureKernel | None = None
        if self.scorer.kind == "trees":
            self.feature_kernel()  # built and checked here, before a server forks

    def feature_kernel(self) -> FeatureKernel:
        """The compiled feature kernel over the bundle's tables, built (and its tables checked) once.

        Raises
        ------
        BundleError
            A table is inconsistent with the catalog.
        """
        if self._features is None:
            m = self.model
            try:
                self._features = FeatureKernel(
                    m.bundle.array, len(m.category_names), int(m.manifest["data_window"]["end_unix"])
                )
            except ValueError as exc:
                raise BundleError(f"bundle {m.version}: {exc}") from exc
        return self._features

    def exact_head(self, size: int) -> ExactHead:
        """The exact-search head of the ``size`` largest-norm items, built once per size.

        Built where the model is loaded: the server's supervisor builds it before forking,
        so the workers share it copy-on-write like the index. Its first tier is the one the
        builder chose for this bundle when it measured a head of this size
        (``evaluation.exact_head_first_tier``), else half the head.

        Raises
        ------
        BundleError
            The bundle's first tier is not a number of items within the head.
        """
        head = self._heads.get(size)
        if head is None:
            m = self.model
            evaluation = m.manifest.get("evaluation") or {}
            first = evaluation.get("exact_head_first_tier") if evaluation.get("exact_head_items") == size else None
            where = f"bundle {m.version}: evaluation.exact_head_first_tier"
            if first is not None and (isinstance(first, bool) or not isinstance(first, int)):
                raise BundleError(f"{where} must be an integer, got {first!r}")
            try:
                head = self._heads[size] = ExactHead(m.item_factors, size, first)
            except ValueError as exc:
                raise BundleError(f"{where}: {exc}") from exc
        return head
