"""Real time: the domain events, their durable log, and each user's state folded from them."""
