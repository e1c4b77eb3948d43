"""model_service: the half of splitserve that holds the weights (forward pass, batching, generation)."""
