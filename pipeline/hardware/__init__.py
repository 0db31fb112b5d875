"""What the hardware can hold and how fast it runs: the GPU table (:mod:`.gpus`), the memory model of a training step
(:mod:`.memory`) and the planner every plan shows (:mod:`.planner`). Arithmetic only: nothing heavy is imported."""
