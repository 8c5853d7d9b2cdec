"""Images as values: descriptors, layers, config, manifests and indexes over a blob store."""
