"""Per-rank side of Stalwart: model, parallelism, data, train step and checkpoint I/O."""
