"""SYSTEM LEVEL, past one process: tensor and pipeline parallelism on torch.distributed (`sharding`: how a model
is split across ranks and the collectives it then needs; `stages`: how it is cut into stages of layers; `pipeline`:
a step's micro-batches through the stages; `workers`: the ranks as processes, driven by the engine's process)."""
