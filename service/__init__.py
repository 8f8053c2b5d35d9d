"""Driver side of Stalwart: config, Ray Train launch, checkpoint catalog and metrics."""
