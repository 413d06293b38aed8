"""docs/builder.md's settings table is the one generated from BuildConfig, whose defaults shared with
the pipeline are the pipeline's own."""

from __future__ import annotations

import dataclasses

from config_probe import ROOT, probe_defaults

from index_builder.config import BuildConfig, config_table_markdown
from ranking.config import marked_table


def test_the_builder_page_shows_the_generated_table():
    text = (ROOT / "docs" / "builder.md").read_text()
    assert marked_table(text) == config_table_markdown(), (
        "docs/builder.md's settings table differs from BuildConfig's fields: run `make docs`"
    )


def test_every_build_setting_has_a_line_of_help():
    rows = config_table_markdown().splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == [f.name for f in dataclasses.fields(BuildConfig)]
    assert all(f.metadata["help"].strip() for f in dataclasses.fields(BuildConfig))


def test_ann_recall_is_measured_at_the_pipelines_candidate_count():
    # Changing the pipeline's n_candidates must move the builder's recall measurement with it.
    new, got = probe_defaults(
        {"eval_candidates": ("ranking.config", "RankerConfig", "n_candidates")}, "index_builder.config", "BuildConfig"
    )
    assert got == new


def test_the_ladder_evaluation_uses_the_builders_protocol_and_settings():
    # The ladder report's splits are the ones the reranker trains on; its recent window,
    # EASE regularization and seed are the build's.
    derived = {
        "cutoff_quantile": ("index_builder.config", "BuildConfig", "rerank_cutoff_quantile"),
        "holdout": ("index_builder.config", "BuildConfig", "rerank_holdout"),
        "recent_days": ("index_builder.config", "BuildConfig", "recent_days"),
        "ease_lambda": ("index_builder.config", "BuildConfig", "ease_lambda"),
        "seed": ("index_builder.config", "BuildConfig", "random_seed"),
    }
    new, got = probe_defaults(derived, "index_builder.evaluate", "EvalConfig")
    assert got == new
