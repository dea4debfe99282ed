"""Tiny, randomly initialised sentence-transformers models built in the tests (no download).

Also a tiny CrossEncoder (:func:`build_tiny_cross_encoder`) for the reranker's contract.

Four architectures the default model does not cover (docs/models.md): BERT with CLS
pooling, BERT with a Dense layer after pooling (another output dimension), XLM-RoBERTa
(no ``token_type_ids``, a Unigram tokenizer trained here on the vendored evaluation
sentences, pad id 1 and position ids offset by it) and MPNet (``<s> … </s>`` frame,
pad id 1, relative attention). Weights come from a seeded config.

Its own module, not conftest: importing ``tests.conftest`` from a test module runs the
conftest a second time under another name, which re-points BENTOML_HOME mid-session.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

HIDDEN = 32
# The small shape every tiny model shares (2 layers, 2 heads): exports in seconds.
_SHAPE: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
_POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


def _write_modules(
    directory: Path,
    *,
    pooling: str,
    normalize: bool,
    max_seq_length: int | None,
    dense_out: int | None,
    include_prompt: bool = True,
) -> None:
    """The sentence-transformers files over a saved transformer: Pooling (→ Dense) (→ Normalize).

    ``max_seq_length=None`` leaves it out of ``sentence_bert_config.json``, as many models
    do: the limit then comes from the tokenizer and the position table.
    """
    import torch

    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    pool_cfg = {
        "word_embedding_dimension": HIDDEN,
        **{k: False for k in _POOLING_KEYS.values()},
        _POOLING_KEYS[pooling]: True,
        "include_prompt": include_prompt,
    }
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg))
    if dense_out:
        from sentence_transformers.models import Dense

        dense = Dense(HIDDEN, dense_out, activation_function=torch.nn.Tanh())
        (directory / "2_Dense").mkdir()
        dense.save(str(directory / "2_Dense"))
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
        )
    if normalize:
        modules.append(
            {
                "idx": len(modules),
                "name": str(len(modules)),
                "path": "N_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    (directory / "modules.json").write_text(json.dumps(modules))
    sbert: dict[str, Any] = {"do_lower_case": False}
    if max_seq_length is not None:
        sbert["max_seq_length"] = max_seq_length
    (directory / "sentence_bert_config.json").write_text(json.dumps(sbert))


# E5-style prompts for the tiny prompt model (conftest's prompt_model_dir).
PROMPTS = {"query": "query: ", "passage": "passage: "}


def build_tiny_st_model(
    directory: Path,
    tokenizer_source: Path,
    *,
    pooling: str = "cls",
    normalize: bool = False,
    max_seq_length: int = 64,
    dense_out: int | None = None,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    include_prompt: bool = True,
) -> Path:
    """A randomly initialised BERT saved as a sentence-transformers directory.

    Covers pooling modes and module stacks the default model does not have,
    without any download: weights come from a seeded config, the tokenizer
    from the default model. ``prompts``/``default_prompt_name`` go into
    config_sentence_transformers.json, ``include_prompt`` into the Pooling config.
    """
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, max_position_embeddings=128, **_SHAPE)
    directory.mkdir(parents=True)
    BertModel(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copyfile(tokenizer_source / name, directory / name)
    _write_modules(
        directory,
        pooling=pooling,
        normalize=normalize,
        max_seq_length=max_seq_length,
        dense_out=dense_out,
        include_prompt=include_prompt,
    )
    if prompts is not None:
        (directory / "config_sentence_transformers.json").write_text(
            json.dumps({"prompts": prompts, "default_prompt_name": default_prompt_name})
        )
    return directory


def training_sentences(per_language: int = 60) -> list[str]:
    """A few hundred vendored sentences in eleven languages (the Unigram's training text)."""
    from embedkit.model import evaldata

    out = evaldata.sts_sentences("test")[:per_language]
    for lang in evaldata.LANGUAGES:
        for s1, s2, _ in evaldata.multilingual(lang)[: per_language // 2]:
            out += [s1, s2]
    return out


def unigram_tokenizer(max_length: int, vocab_size: int = 800) -> Any:
    """An XLM-R-style SentencePiece Unigram tokenizer, trained here, as XLMRobertaTokenizerFast.

    Same special tokens and ids as XLM-R (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3,
    ``<mask>`` last), Metaspace pre-tokenisation, cased, ``<s> $A </s>`` frame.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(training_sentences(), trainer=trainer)
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return XLMRobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=max_length,
    )


def build_tiny_xlmr_model(
    directory: Path,
    *,
    pooling: str = "mean",
    normalize: bool = True,
    max_seq_length: int = 64,
) -> Path:
    """A randomly initialised XLM-RoBERTa with its own trained Unigram tokenizer.

    ``max_position_embeddings`` is ``max_seq_length + 2`` as in XLM-R itself (514 for
    512): position ids start after ``padding_idx`` (1), so a full-length text uses the
    last row. Like many XLM-R models it declares no ``max_seq_length`` of its own:
    sentence-transformers takes the tokenizer's ``model_max_length`` (capped at the
    position table), and so must the export.
    """
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    tokenizer = unigram_tokenizer(max_seq_length)
    torch.manual_seed(0)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_seq_length + 2,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **_SHAPE,
    )
    directory.mkdir(parents=True)
    XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    _write_modules(
        directory,
        pooling=pooling,
        normalize=normalize,
        max_seq_length=None,
        dense_out=None,
    )
    return directory


def build_tiny_mpnet_model(
    directory: Path,
    tokenizer_source: Path,
    *,
    pooling: str = "mean",
    normalize: bool = True,
    max_seq_length: int = 64,
) -> Path:
    """A randomly initialised MPNet with MPNet's tokenizer over the default model's vocabulary.

    MPNet's vocabulary is BERT's with ``<s> <pad> </s> <unk>`` in front and ``<mask>`` at
    the end (so pad id 1, ``<s> … </s>`` frame, lowercased by the tokenizer itself).
    """
    import torch
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizerFast

    directory.mkdir(parents=True)
    bert_vocab = (tokenizer_source / "vocab.txt").read_text(encoding="utf-8").splitlines()
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text(
        "\n".join(["<s>", "<pad>", "</s>", "<unk>", *bert_vocab, "<mask>"]) + "\n",
        encoding="utf-8",
    )
    tokenizer = MPNetTokenizerFast(
        vocab_file=str(vocab_file), do_lower_case=True, model_max_length=max_seq_length
    )
    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_seq_length + 2,
        relative_attention_num_buckets=32,
        pad_token_id=tokenizer.pad_token_id,
        **_SHAPE,
    )
    MPNetModel(config, add_pooling_layer=False).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    _write_modules(
        directory,
        pooling=pooling,
        normalize=normalize,
        max_seq_length=max_seq_length,
        dense_out=None,
    )
    return directory


def build_tiny_cross_encoder(
    directory: Path,
    tokenizer_source: Path,
    *,
    max_seq_length: int = 64,
    activation: str | None = None,
) -> Path:
    """A randomly initialised ``BertForSequenceClassification`` (one label) saved by
    sentence-transformers' ``CrossEncoder.save``, so ``CrossEncoder(directory)`` loads it.

    Weights are drawn wider than BERT's (``initializer_range`` 0.2, not 0.02): with the
    default, every pair scores within 1e-4 of every other and a parity check at 1e-4 could
    not tell one tokenisation from another. ``activation`` (a ``torch.nn`` class name) is
    saved as the model's activation_fn; None keeps CrossEncoder's default (Sigmoid).
    """
    import tempfile

    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        max_position_embeddings=128,
        num_labels=1,
        initializer_range=0.2,
        **_SHAPE,
    )
    with tempfile.TemporaryDirectory() as tmp:
        BertForSequenceClassification(config).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(tmp)
        kwargs: dict[str, Any] = {}
        if activation is not None:
            kwargs["activation_fn"] = getattr(torch.nn, activation)()
        model = CrossEncoder(tmp, max_length=max_seq_length, device="cpu", **kwargs)
        directory.mkdir(parents=True)
        model.save(str(directory))
    return directory


# name → builder(directory, default model dir): the architectures the contract and the
# service are proven on beside the default model (tests/test_architectures.py).
TINY_ARCHITECTURES: dict[str, Callable[[Path, Path], Path]] = {
    "bert-cls": lambda d, src: build_tiny_st_model(d, src, pooling="cls"),
    "bert-dense": lambda d, src: build_tiny_st_model(
        d, src, pooling="mean", normalize=True, dense_out=16
    ),
    "xlm-roberta": lambda d, _src: build_tiny_xlmr_model(d),
    "mpnet": lambda d, src: build_tiny_mpnet_model(d, src),
}
