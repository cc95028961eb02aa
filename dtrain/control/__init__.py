"""Control plane: the coordinator (membership, quorum rounds, commits), the peer-side
client, authentication and TLS. Holds no tensors and imports no model code."""
