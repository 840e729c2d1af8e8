"""moe_blocks.models: reference models assembled from the blocks (JetMoE-8B)."""


def __getattr__(name: str):
    # parallelize (models/parallel.py) needs torch.distributed's tensor and FSDP modules, ~1 s to
    # import: loaded on first use, as moe_blocks.models.parallelize.
    if name == "parallelize":
        from .parallel import parallelize

        return parallelize
    raise AttributeError(f"module 'moe_blocks.models' has no attribute {name!r}")
