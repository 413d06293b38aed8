"""One Rank request: query, budget, features, the overlay of real-time state and policy, the ranker."""
