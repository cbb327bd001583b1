"""Multi-process deployments (MII LOCAL gRPC server, DeepSpeed-launcher tensor parallel): free ports,
process trees, GPU memory accounting and the channel to a tensor-parallel worker. Nothing here imports
torch, DeepSpeed or MII at import time, so the teardown machinery works even where they are broken."""
