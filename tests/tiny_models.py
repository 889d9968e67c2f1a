"""Tiny random models of each family and tokenizers that build offline, for the model-layer tests.

Everything here is built in milliseconds from transformers configs and the `tokenizers` library,
so the tests need neither the hub nor /work/shared (the real GPT-2 vocabulary is used when present).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2TokenizerFast,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

# the shared data folder: $EDITSCALE_SHARED, else ../shared next to the repository
SHARED_DIR = Path(os.environ.get("EDITSCALE_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
GPT2_TOKENIZER_DIR = SHARED_DIR / "data/tokenizers/gpt2"

SUBJECTS = ["Paris", "Danielle Darrieux", "Toko Yasuda", "Autonomous University of Madrid", "Apple A5",
            "Edwin of Northumbria", "the Big Apple", "New York", "Thomas Joannes Stieltjes", "BBC One"]
RELATIONS = ["{} is located in the country of", "The mother tongue of {} is", "{} was developed by",
             "{}, which is a twin city of", "In {}, the official language is", "{} plays the",
             "The headquarters of {} are in"]
OBJECTS = ["France", "English", "Spain", "Apple", "Google", "London", "Christianity", "piano", "Dutch"]


def sentences() -> list[str]:
    return [r.format(s) + " " + o + "." for r in RELATIONS for s in SUBJECTS for o in OBJECTS]


def byte_bpe_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (no BOS, spaces glued to the next word)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(sentences(), vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")


def sentencepiece_tokenizer(vocab_size: int = 200) -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: "▁" marks spaces, BOS is prepended by the post-processor.

    Like the legacy Llama-2 tokenizer it always prepends "▁", so " Paris" on its own becomes
    "▁", "▁Paris" and not what "Paris" is after a space inside a sentence (docs/protocol.md §10.8).
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Prepend("▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,'▁")
    tok.train_from_iterator(sentences(), trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                             special_tokens=["<unk>", "<s>", "</s>"],
                                                             initial_alphabet=alphabet))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def gpt2_tokenizer() -> GPT2TokenizerFast:
    """The real GPT-2 BPE, or a skip when the shared data folder is absent."""
    if not (GPT2_TOKENIZER_DIR / "vocab.json").is_file():
        pytest.skip(f"GPT-2 tokenizer files not found in {GPT2_TOKENIZER_DIR}")
    return GPT2TokenizerFast.from_pretrained(str(GPT2_TOKENIZER_DIR))


def tiny_config(model_type: str, vocab_size: int, *, square: bool = False):
    """A 2-block config with d_model 32; `square` makes the MLP inner size equal d_model."""
    d, layers, heads = 32, 2, 4
    inner = d if square else 64
    if model_type == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=d, n_layer=layers, n_head=heads,
                          n_inner=inner, bos_token_id=0, eos_token_id=0)
    if model_type == "gptj":
        return GPTJConfig(vocab_size=vocab_size, n_positions=64, n_embd=d, n_layer=layers, n_head=heads,
                          n_inner=inner, rotary_dim=4, bos_token_id=0, eos_token_id=0)
    if model_type == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, max_position_embeddings=64, hidden_size=d,
                             num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inner,
                             bos_token_id=0, eos_token_id=0)
    kwargs = dict(vocab_size=vocab_size, max_position_embeddings=64, hidden_size=d, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=2, intermediate_size=inner,
                  bos_token_id=1, eos_token_id=2)
    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[model_type]
    return config_class(**kwargs)


def tiny_model(model_type: str, vocab_size: int, *, square: bool = False, seed: int = 0,
               dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, vocab_size, square=square))
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    return model


def tokenizer_for(model_type: str) -> PreTrainedTokenizerFast:
    """The offline tokenizer matching a family's spacing style."""
    return sentencepiece_tokenizer() if model_type in ("llama", "mistral") else byte_bpe_tokenizer()


def reference_subject_last(tok, template: str, subject: str) -> int:
    """The reference's piecewise subject-last index (docs/protocol.md §2.3): right for byte-level BPE without BOS.

    Tests use it as an independent check of the adapter's offset-based indices.
    """
    prefix = template[: template.index("{}")]
    if prefix:
        assert prefix.endswith(" ")
        return len(tok(prefix[:-1])["input_ids"]) + len(tok(" " + subject)["input_ids"]) - 1
    return len(tok(subject)["input_ids"]) - 1


def random_spd(n: int, seed: int = 0) -> torch.Tensor:
    """A well-conditioned random second-moment matrix, fp64, to pass in as C."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    return a @ a.T / (3 * n) + 0.1 * torch.eye(n, dtype=torch.float64)
