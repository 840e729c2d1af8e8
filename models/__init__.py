"""moe_blocks.models: reference models assembled from the blocks (JetMoE-8B)."""
