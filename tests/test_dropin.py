"""The drop-in example of docs/examples: MoEMLP in a GPT we did not write trains."""

from .helpers import script_module


def test_moe_mlp_drops_into_a_small_gpt_and_it_learns():
    example = script_module("docs/examples/tiny_gpt_moe.py")
    result = example.train(steps=30)
    losses = result["losses"]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    loads = result["router_stats"]["tokens_per_expert"]
    assert set(loads) == {"blocks.0.mlp.router", "blocks.1.mlp.router"}
    for load in loads.values():
        assert sum(load) == 16 * 64 * 2  # every token went to 2 experts
    assert result["router_stats"]["aux_loss"] > 0
