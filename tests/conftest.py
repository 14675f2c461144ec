"""Fixtures shared by the recipe tests."""
import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Llama checkpoint (2 layers, hidden 64, the byte vocabulary), written once per session."""
    import llama

    torch.manual_seed(0)
    config = llama.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=258, bos_token_id=256, eos_token_id=257)
    directory = tmp_path_factory.mktemp("tiny-random-llama")
    llama.save_checkpoint(llama.Llama(config), directory)
    return directory
