"""Data formats: the seeded manifest, labelled faces, and dataset shards."""
