"""Shards in, two augmented views out: reading (`shards`), clip choice (`clips`), the Python side (`source`), the
DALI graph (`pipeline`), to PyTorch (`loader`); and the plain DataLoader the benchmark compares with."""
