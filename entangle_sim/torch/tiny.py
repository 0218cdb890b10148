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


# Decoder-only families that build tiny from transformers 5.x: name -> (config class, model class,
# config keywords beyond the common ones). Width w, `layers` layers, 2 heads of w/2; intermediate 2w.
def _family_kwargs(w: int, L: int) -> dict:
    std = dict(hidden_size=w, intermediate_size=2 * w, num_hidden_layers=L, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=64, head_dim=w // 2)
    gpt = dict(n_embd=w, n_layer=L, n_head=2, n_positions=64)
    moe = dict(std, num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=w,
               shared_expert_intermediate_size=w, decoder_sparse_step=1, mlp_only_layers=[])
    return {
        "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(gpt)),
        "llama": ("LlamaConfig", "LlamaForCausalLM", dict(std, tie_word_embeddings=False)),
        "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(std, tie_word_embeddings=True)),
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(std)),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(std)),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(std)),
        "phi": ("PhiConfig", "PhiForCausalLM", dict(std, partial_rotary_factor=0.5)),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(std)),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(std)),
        "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(gpt, rotary_dim=4)),
        "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(std)),
        "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(std)),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(std)),
        "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(gpt)),
        "codegen": ("CodeGenConfig", "CodeGenForCausalLM", dict(gpt, n_ctx=64, rotary_dim=4)),
        "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM",
                    dict(hidden_size=w, num_layers=L, num_heads=2, max_position_embeddings=64,
                         attention_types=[[["global", "local"], max(1, L // 2)]] if L > 1 else [[["global"], 1]],
                         window_size=8)),
        "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(std)),
        "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=w, ffn_dim=2 * w, num_hidden_layers=L,
                                                     num_attention_heads=2, max_position_embeddings=64,
                                                     word_embed_proj_dim=w)),
        "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=w, n_layer=L, n_head=2)),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(moe)),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(std)),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(std, sliding_window=8)),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(std, sliding_window=8)),
        "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=w, num_hidden_layers=L,
                                                             num_attention_heads=2, new_decoder_architecture=False,
                                                             parallel_attn=True, bias=True)),
        "cohere": ("CohereConfig", "CohereForCausalLM", dict(std)),
        "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(moe)),
        "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(moe)),
        "granite": ("GraniteConfig", "GraniteForCausalLM", dict(std)),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(moe)),
        "glm": ("GlmConfig", "GlmForCausalLM", dict(std)),
        "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", dict(std)),
        "mpt": ("MptConfig", "MptForCausalLM", dict(d_model=w, n_heads=2, n_layers=L, expansion_ratio=2,
                                                    max_seq_len=64)),
        "biogpt": ("BioGptConfig", "BioGptForCausalLM", dict(std)),
    }


FAMILIES = tuple(_family_kwargs(16, 1))


def tiny_family(family: str, tokenizer=None, *, width: int = 16, layers: int = 1, seed: int = 0,
                dtype=None):
    """A tiny random-init causal LM of a Hugging Face family in `FAMILIES` (eval mode, float64 when
    dtype=torch.float64; eager attention, so every family runs the same kernels under torch.func)."""
    import torch
    import transformers

    tok = tokenizer or tiny_tokenizer()
    table = _family_kwargs(width, layers)
    if family not in table:
        raise ValueError(f"unknown family {family!r} (one of {', '.join(FAMILIES)})")
    cname, mname, kw = table[family]
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.eos_token_id)
    for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "attention_dropout",
              "dropout", "hidden_dropout_prob", "attention_probs_dropout_prob"):
        common[k] = 0.0
    cfg = getattr(transformers, cname)(**common, **kw)
    cfg._attn_implementation = "eager"
    if hasattr(cfg, "_experts_implementation"):  # the eager expert loop (runs in float64)
        cfg._experts_implementation = "eager"
    model = getattr(transformers, mname)(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def toy_rollout_rows(n: int = 8, G: int = 8, *, seed: int = 0, shared_stem: bool = False) -> list[dict]:
    """n GRPO rollout rows (`prompt`, `completions` (G strings), `rewards` (G numbers)) over the tiny vocabulary.

    shared_stem=False: G independent random completions (2-6 words), rewards 1 with probability 0.4;
    shared_stem=True: G completions sharing a random 4-word stem and differing in the last word, reward 1
    for a positive last word (the "same reasoning, different answer" shape of math rollouts).
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = rng.choice(["the movie", "the film", "the story"]) + " was "
        if shared_stem:
            stem = " ".join(rng.choice(WORDS[10:]) for _ in range(4))
            comps = [stem + " " + rng.choice(["good", "bad", "great", "awful", "fine", "sad"]) for _ in range(G)]
            rewards = [float(c.split()[-1] in ("good", "great", "fine")) for c in comps]
        else:
            comps = [" ".join(rng.choice(WORDS[10:]) for _ in range(rng.randint(2, 6))) for _ in range(G)]
            rewards = [float(rng.random() < 0.4) for _ in range(G)]
        rows.append({"prompt": prompt, "completions": comps, "rewards": rewards})
    return rows
