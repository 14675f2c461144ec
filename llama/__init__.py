"""llama: a small pure-PyTorch Llama with Hugging Face names that streams checkpoints layer by layer.

    cfg = llama.LlamaConfig.preset("llama-2-70b")          # or LlamaConfig.from_hf("ckpt/")
    with torch.device("meta"):
        model = llama.Llama(cfg)                           # 70B shape, no memory
    for layer, tensors in llama.iter_checkpoint("ckpt/"):  # one decoder layer at a time
        ...
    logits = model(ids, position_ids=pos, attention_mask=mask)   # packing: see llama.masks
    new_tokens = llama.generate(model, [prompt_ids], max_new_tokens=50)  # KV cache, greedy by default
"""
from .checkpoint import iter_checkpoint, load_checkpoint, save_checkpoint
from .config import PRESETS, LlamaConfig
from .generate import Sampling, generate
from .kv_cache import KVCache
from .model import Llama, causal_lm_loss
from .tokenizer import ByteTokenizer, load_tokenizer

__all__ = ["LlamaConfig", "PRESETS", "Llama", "causal_lm_loss", "iter_checkpoint", "load_checkpoint",
           "save_checkpoint", "ByteTokenizer", "load_tokenizer", "KVCache", "generate", "Sampling"]
