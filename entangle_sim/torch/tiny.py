"""Tiny local models, tokenizer and preference rows (tests, notebook, examples; nothing downloads).

    tok = tiny_tokenizer()                      # word-level, with a chat template
    model = tiny_model("gpt2", tok)             # 2 layers, width 32, random weights, tied embeddings
    rows = toy_rows(8)                          # TRL standard-format rows
"""
from __future__ import annotations

import random

WORDS = ("the movie was good bad great awful fine boring fun sad happy plot acting music long short "
         "i liked hated it very not so really a an film story ending cast scene review say").split()

# A minimal ChatML-like template; the generation prompt is a prefix of the rendered conversation.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer(words=WORDS):
    """Word-level `PreTrainedTokenizerFast` (whitespace split) with <pad>, <unk>, <eos> and chat tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    vocab = {w: i for i, w in enumerate(special + sorted(set(words)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(arch: str = "gpt2", tokenizer=None, *, width: int = 32, layers: int = 2, seed: int = 0,
               dropout: float = 0.0):
    """A random causal LM of `arch` in {'gpt2', 'llama', 'gpt_neox'} sized to the tokenizer (eval mode;
    dropout 0 by default so that training steps follow the first-order theory)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    tok = tokenizer or tiny_tokenizer()
    V = len(tok)
    torch.manual_seed(seed)
    common = dict(vocab_size=V, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.eos_token_id)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=4, n_positions=128, resid_pdrop=dropout,
                         embd_pdrop=dropout, attn_pdrop=dropout, **common)
        model = GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=False, **common)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=128, **common)
        model = GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r} (gpt2, llama, gpt_neox)")
    return model.eval()


def toy_rows(n: int = 8, *, seed: int = 0, conversational: bool = False) -> list[dict]:
    """n preference rows in TRL format over the tiny vocabulary (shared prompt, one-word contrast)."""
    rng = random.Random(seed)
    good = ["good", "great", "fun", "fine", "happy"]
    bad = ["bad", "awful", "boring", "sad", "long"]
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(["the movie", "the film", "the story", "the plot"]).split()
                          + ["was"])
        tail = " ".join(rng.choice(WORDS[10:]) for _ in range(rng.randint(0, 3)))
        c = (rng.choice(good) + " " + tail).strip()
        r = (rng.choice(bad) + " " + tail).strip()
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": c}],
                         "rejected": [{"role": "assistant", "content": r}]})
        else:
            rows.append({"prompt": prompt + " ", "chosen": c + " ", "rejected": r + " "})
    return rows
