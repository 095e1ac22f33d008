"""Write the serving benchmark's checkpoint: a random 4-layer Qwen3-MoE in bf16, with a tokenizer.

    python benchmarks/serving_model.py                       # -> benchmarks/.serving_model
    python benchmarks/serving_model.py --out /tmp/qwen3moe-bench --seed 0

The model is small enough for a 2-core CPU yet shaped like a real MoE: its
experts hold 92% of the weights, so a decode step is bound by reading them.

    layers 4, hidden 1024, all layers MoE: 8 experts, top-2, moe_intermediate 2048
    attention 16 query heads / 4 KV heads, head_dim 64 (q and o are 1024 x 1024)
    vocab 4096: a byte-level BPE trained here on generated pseudo-words
    experts 4 x 8 x 3 x 1024 x 2048 = 201.3 M params (403 MB in bf16)
    dense (attention, norms, router, embeddings, lm_head) 19.1 M params (38 MB)

Weights are random (transformers' init, seeded), so generations are noise: the
benchmark sends ``ignore_eos`` to get its output lengths. The tokenizer has a
ChatML chat template so that /v1/chat/completions works too. Written with
``save_pretrained`` (model and tokenizer): loadable by transformers'
AutoModelForCausalLM / AutoTokenizer, by vLLM and by ``epmoe.from_pretrained``.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / ".serving_model"
VOCAB = 4096
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
# Shape of the model; every field is a Qwen3MoeConfig field.
MODEL = dict(
    hidden_size=1024,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=2048,
    intermediate_size=2048,  # dense MLP size; unused, as every layer is MoE
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def pseudo_text(n_words: int, seed: int) -> list[str]:
    """Lines of pseudo-English: words built from syllables, Zipf-distributed,
    so that BPE merges grow into whole words."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v",
              "w", "st", "tr", "pl", "ch", "sh", "th", "gr", "br"]
    nuclei = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "ng", "st"]
    lexicon = sorted({"".join(rng.choice(onsets) + rng.choice(nuclei) + rng.choice(codas)
                              for _ in range(rng.randint(1, 3))) for _ in range(6000)})
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]
    rng.shuffle(lexicon)
    words = rng.choices(lexicon, weights=weights, k=n_words)
    lines, i = [], 0
    while i < len(words):
        n = rng.randint(5, 15)
        line = " ".join(words[i:i + n])
        lines.append(line[:1].upper() + line[1:] + rng.choice([".", ".", ",", "?", "!"]))
        i += n
    return lines


def make_tokenizer(seed: int = 0):
    """A byte-level BPE of ``VOCAB`` tokens (specials first) with a ChatML template,
    as a transformers ``PreTrainedTokenizerFast``. No token is added on encode, so
    the prompt's token count is what the benchmark asked for."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(pseudo_text(200_000, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main(out: str | Path = DEFAULT_OUT, seed: int = 0) -> Path:
    """Write the checkpoint (config, bf16 safetensors, generation config, tokenizer) to ``out``."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    out = Path(out)
    tokenizer = make_tokenizer(seed)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), bos_token_id=None,
                            eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, dtype="bfloat16", **MODEL)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    n_experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"wrote {out}: {n_params / 1e6:.1f} M params ({n_experts / 1e6:.1f} M in experts), "
          f"vocab {len(tokenizer)}, bf16")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="checkpoint folder")
    parser.add_argument("--seed", type=int, default=0)
    main(**vars(parser.parse_args()))
