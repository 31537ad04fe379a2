"""Tiny tokenized text for the text-classifier tests: a word-level tokenizer and model configs.

Sentences are made in code from a 24-word vocabulary: y is the sentiment word
("good"/"bad"), the sensitive attribute s is the topic word ("film"/"book"),
which agrees with y 80% of the time; g = s + 2·y. Nothing is downloaded.
"""

from __future__ import annotations

import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOPICS = ["film", "book"]  # s = 0, 1
SENTIMENT = ["bad", "good"]  # y = 0, 1
FILLER = ["the", "a", "was", "is", "very", "plot", "story", "it", "and", "quite", "long",
          "short", "this", "that", "one", "so", "my"]  # fmt: skip
WORDS = SPECIAL + TOPICS + SENTIMENT + FILLER
MAX_LEN = 16

# Shared by every family: hidden 32, 2 layers, 2 heads, pad = 0, [CLS] = 2, [SEP] = 3.
COMMON = dict(
    vocab_size=len(WORDS),
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=MAX_LEN + 4,  # RoBERTa-style position ids start after pad
    num_labels=2,
    pad_token_id=0,
)
DISTILBERT = dict(
    vocab_size=len(WORDS),
    dim=32,
    n_layers=2,
    n_heads=2,
    hidden_dim=64,
    max_position_embeddings=MAX_LEN,
    num_labels=2,
    pad_token_id=0,
)
FAMILIES: dict[str, tuple[str, dict, str]] = {
    # name: (config class, kwargs, name of the layer whose input are the features)
    "bert": ("BertConfig", COMMON, "classifier"),
    "distilbert": ("DistilBertConfig", DISTILBERT, "classifier"),
    "roberta": ("RobertaConfig", COMMON, "classifier.out_proj"),
    "xlm_roberta": ("XLMRobertaConfig", COMMON, "classifier.out_proj"),
    "electra": ("ElectraConfig", {**COMMON, "embedding_size": 16}, "classifier.out_proj"),
    "deberta_v2": ("DebertaV2Config", COMMON, "classifier"),
    "albert": ("AlbertConfig", {**COMMON, "embedding_size": 16}, "classifier"),
    "modernbert": (
        "ModernBertConfig",
        {**COMMON, "bos_token_id": 2, "eos_token_id": 3, "cls_token_id": 2, "sep_token_id": 3},
        "classifier",
    ),
}

# Decoder classifiers apply ``score`` to every token and pool the logits at the last
# non-padding token; their features are ``score``'s input at that token.
DECODERS: dict[str, tuple[str, dict]] = {
    "gpt2": (
        "GPT2Config",
        {
            "vocab_size": len(WORDS),
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 2,
            "n_inner": 64,
            "n_positions": MAX_LEN,
            "num_labels": 2,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
        },
    ),
    "llama": (
        "LlamaConfig",
        {**COMMON, "num_key_value_heads": 2, "bos_token_id": 2, "eos_token_id": 3},
    ),
}


def tokenizer():
    """A word-level fast tokenizer over :data:`WORDS` (``[CLS] ... [SEP]``, pad id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=MAX_LEN,
    )  # fmt: skip


def sentences(n: int, seed: int = 0) -> dict[str, list]:
    """``n`` sentences of 3..12 words with ``text``, ``label``, ``group`` and ``id`` columns."""
    gen = torch.Generator().manual_seed(seed)
    rows: dict[str, list] = {"text": [], "label": [], "group": [], "id": []}
    for i in range(n):
        y = i % 2
        s = y if float(torch.rand(1, generator=gen)) < 0.8 else 1 - y
        count = int(torch.randint(1, 11, (1,), generator=gen))
        words = [FILLER[int(j)] for j in torch.randint(0, len(FILLER), (count,), generator=gen)]
        words.insert(int(torch.randint(0, count + 1, (1,), generator=gen)), SENTIMENT[y])
        words.insert(0, TOPICS[s])
        rows["text"].append(" ".join(words))
        rows["label"].append(y)
        rows["group"].append(s + 2 * y)
        rows["id"].append(100 + i)
    return rows


def tokenized(n: int, seed: int = 0):
    """A ``datasets.Dataset`` of ``n`` tokenized sentences (input_ids, attention_mask, label,
    group, id); lengths vary, so batches need padding."""
    import datasets

    tok = tokenizer()
    raw = datasets.Dataset.from_dict(sentences(n, seed))
    return raw.map(
        lambda b: tok(b["text"], truncation=True, max_length=MAX_LEN),
        batched=True,
        remove_columns=["text"],
    )


def build(family: str, seed: int = 0):
    """A tiny randomly initialised ``AutoModelForSequenceClassification`` of ``family``."""
    import transformers as tf

    cls, kw = DECODERS[family] if family in DECODERS else FAMILIES[family][:2]
    torch.manual_seed(seed)
    return tf.AutoModelForSequenceClassification.from_config(getattr(tf, cls)(**kw))


def perturbed_copy(model):
    """An eval-mode copy of ``model`` with every weight moved a little (its features differ)."""
    import copy

    original = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in original.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return original
