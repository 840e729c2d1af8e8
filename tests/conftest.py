"""Test setup. Without a GPU the Triton backend runs on CPU tensors through the Triton
interpreter, which must be switched on before triton (and so moe_blocks) is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("gpu_check", parent=settings.get_profile("default"), max_examples=25)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poisoned_memory():
    """Fill every uninitialised tensor with NaN (floats) or the max value (integers), so an
    output element a kernel forgot to write fails the comparison instead of passing by luck."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


# A transformers JetMoe checkpoint with its own tokenizer (test_tokenizers.py, test_lora.py)
VOCAB = 300  # the tokenizer's size: not 256, so bytes as ids would be caught


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for index in range(120):
        (folder / f"m{index:02d}.py").write_text(
            f"def function_{index}(value):\n    '''Return the value plus {index}.'''\n"
            f"    return value + {index}\n\n\nclass Thing{index}:\n    size = {index * 7}\n"
        )
    return folder


@pytest.fixture
def tokenizer_dir(tmp_path, corpus):
    """A BPE tokenizer of 300 tokens trained on the corpus, saved as transformers saves one."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator([p.read_text() for p in sorted(corpus.iterdir())], trainer)
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>"
    )
    folder = tmp_path / "tokenizer"
    wrapped.save_pretrained(folder)
    return folder


@pytest.fixture
def hf_checkpoint(tmp_path, tokenizer_dir):
    """A transformers JetMoe checkpoint (tiny) with that tokenizer beside its weights."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tokenizer) == VOCAB
    config = transformers.JetMoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, intermediate_size=32,
        kv_channels=8, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.JetMoeForCausalLM(config)
    folder = tmp_path / "released"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
