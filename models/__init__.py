"""moe_blocks.models: the reference model assembled from the blocks (JetMoE-8B, in
:mod:`.jetmoe`) and the applications built on it: training (:mod:`.train`), the benchmark
harness (:mod:`.bench`) and the command line (:mod:`.cli`, argument parsing only)."""

if __name__ == "models":
    # Imported as the top-level "models" from a checkout root on sys.path: hand over to the
    # installed package of that name, as kernels/ does (kernels/_checkout.py says why).
    import importlib.util
    from pathlib import Path

    _path = Path(__file__).resolve().parent.parent / "kernels" / "_checkout.py"
    _spec = importlib.util.spec_from_file_location("_moe_blocks_checkout", _path)
    _checkout = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_checkout)
    _checkout.hand_over(__name__, __file__)


def __getattr__(name: str):
    # parallelize (models/jetmoe/sharding.py) needs torch.distributed's tensor and FSDP modules,
    # ~1 s to import: loaded on first use, as moe_blocks.models.parallelize.
    if name == "parallelize":
        from .jetmoe.sharding import parallelize

        return parallelize
    raise AttributeError(f"module 'moe_blocks.models' has no attribute {name!r}")
