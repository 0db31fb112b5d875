"""The evaluation layer: lm-eval tasks from local mirrors and the shipped zh_smoke (:mod:`.evalsets`), lm-eval's
results as scores, CSV rows and per-item correctness (:mod:`.results`), and the forgetting gate (:mod:`.forgetting`)."""
