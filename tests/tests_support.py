"""Settings shared by the tests (importable from any test module)."""

SMALL_BUILD = {"factors": 16, "iterations": 12, "eval_users": 200}
