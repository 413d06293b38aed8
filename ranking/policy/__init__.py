"""Policy from configuration: context rules and experiments."""
