"""zh-align: Chinese-first LoRA/QLoRA SFT, ORPO/DPO alignment, evaluation and export of Qwen models, tracked in MLflow.

The entry points sit here, one per Make target: the stages (prepare, sft, align, evaluate, export), each declaring
itself with ``STAGE = Stage(...)``, and the commands over them (plan, pipeline, rerun, registry). Below them, each
importing only downward: ``stage/`` (the stage contract), ``training/`` and ``evaluation/``, ``data/``, ``tracking/``
(the only MLflow user) and ``models/``, and ``core/``. docs/ARCHITECTURE.md has the map.
"""
