"""The data pipeline's building blocks: text hygiene (text.py); loaders, dedup, buckets and the sampler follow."""
