"""The base model of a model definition on disk and in memory: the tiny offline builds (:mod:`.tiny`), and loading
the base, its tokenizer and a LoRA adapter on top, bf16 or 4-bit (:mod:`.loading`)."""
