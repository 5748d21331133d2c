"""The runtime under every pass over the data: batching and sharding, processes, the model's forward, I/O."""
