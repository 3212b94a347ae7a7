"""SYSTEM LEVEL, past one process: tensor parallelism on torch.distributed (`sharding`: how a model is split and
the collectives it then needs; `workers`: the ranks as processes, driven by the engine's process)."""
