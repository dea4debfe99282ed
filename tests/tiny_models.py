"""A tiny, randomly initialised sentence-transformers model built in the tests (no download).

Its own module, not conftest: importing ``tests.conftest`` from a test module runs the
conftest a second time under another name, which re-points BENTOML_HOME mid-session.
"""

from __future__ import annotations

import shutil
from pathlib import Path

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
    import json

    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    directory.mkdir(parents=True)
    BertModel(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copyfile(tokenizer_source / name, directory / name)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    keys = {
        "cls": "pooling_mode_cls_token",
        "mean": "pooling_mode_mean_tokens",
        "max": "pooling_mode_max_tokens",
        "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
        "weightedmean": "pooling_mode_weightedmean_tokens",
        "lasttoken": "pooling_mode_lasttoken",
    }
    pool_cfg = {
        "word_embedding_dimension": 32,
        **{k: False for k in keys.values()},
        keys[pooling]: True,
        "include_prompt": include_prompt,
    }
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg))
    if dense_out:
        from sentence_transformers.models import Dense

        dense = Dense(32, dense_out, activation_function=torch.nn.Tanh())
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
    if prompts is not None:
        (directory / "config_sentence_transformers.json").write_text(
            json.dumps({"prompts": prompts, "default_prompt_name": default_prompt_name})
        )
    (directory / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
    )
    return directory
