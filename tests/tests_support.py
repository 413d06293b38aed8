"""Settings shared by the tests (importable from any test module)."""

# The standard synthetic shop draws purchases at random, so its buyers buy an item again by
# chance (9%) and the learned re-purchase policy would offer nearly everything again: the
# shared bundles keep today's "a purchase ends the need", which most tests are about;
# tests/index_builder/test_repeat.py builds a grocery shop with the learned policy.
SMALL_BUILD = {"factors": 16, "iterations": 12, "eval_users": 200, "repeat_policy": "never"}
