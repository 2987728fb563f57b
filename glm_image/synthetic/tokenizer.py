"""A small GLM-Image prompt tokenizer, built offline with the `tokenizers` library.

The released tokenizer (GLM-4's byte-level BPE, shifted behind the image vocabulary) cannot be
downloaded here, so synthetic checkpoints carry a small one with the same *shape*:

- ids ``0 .. vision_vocab_size-1`` are the image tokens ``<|dit_token_N|>``; 16384 (image start,
  bos) and 16385 (image end, eos, pad) are special tokens, as in the release;
- byte-level BPE text tokens follow from ``vision_vocab_size`` on, learned from a small built-in
  English and Chinese corpus (so merges, digits, quotes and CJK all exercise real code paths);
- the GLM special tokens keep their released ids (``<|endoftext|>`` = 167841, ``<sop>`` = 167845,
  ``<eop>`` = 167846, ``<|image|>`` = 167855, ...), read from the preset's
  ``processor/tokenizer_config.json``.

Text token ids differ from the release; every id the engine relies on does not.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["build_glm_tokenizer"]

# GLM-4's pre-tokenisation split (a tiktoken-style pattern: contractions, letters, up to three
# digits, punctuation runs, newlines, spaces), followed by byte-level encoding.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# What the merges are learned from: prompts of the kind GLM-Image is used for.
_CORPUS = (
    "A photo of an astronaut riding a horse on mars.",
    "A vintage poster with the title 'SUMMER SALE' in bold red letters and the subtitle \"50% off\".",
    "A storefront sign that says 'OPEN' hanging in the window, warm evening light.",
    "An infographic about the water cycle: evaporation, condensation, precipitation, collection.",
    "A birthday card that reads “Happy Birthday, Anna!” with balloons and confetti.",
    "The menu board lists coffee 3.50, tea 2.75 and cake 4.25 in chalk handwriting.",
    "一张海报，标题写着「春节快乐」，背景是红色的灯笼和烟花。",
    "一只猫坐在写着“欢迎光临”的招牌旁边，阳光明媚。",
    "书店门口的黑板上写着'今日特价'和'新书上架'。",
    "科技发布会的幻灯片，大字写着“人工智能改变世界”，下方是 2026 年 11 月。",
    "1024 x 1024, 1280 x 1280, 1568 x 1056, 960 x 1728, 512 512 2048",
)


def build_glm_tokenizer(
    special_tokens: Mapping[int, str],
    *,
    vision_vocab_size: int,
    text_vocab_size: int = 600,
) -> Tokenizer:
    """Build the tokenizer; ``special_tokens`` maps fixed ids to their strings (e.g. 167845: "<sop>")."""
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizer
    learner.train_from_iterator(
        _CORPUS,
        trainers.BpeTrainer(
            vocab_size=text_vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    learned = json.loads(learner.to_str())["model"]

    vocab = {f"<|dit_token_{i}|>": i for i in range(vision_vocab_size)}
    vocab.update({token: vision_vocab_size + i for token, i in learned["vocab"].items()})
    first_special = min(i for i in special_tokens if i >= vision_vocab_size)
    if max(vocab.values()) >= first_special:
        raise ValueError(f"text_vocab_size {text_vocab_size} overlaps the special tokens at {first_special}")
    for token_id, token in special_tokens.items():
        vocab[token] = token_id

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in learned["merges"]]))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    # Added tokens are matched before BPE, so "<sop>" in a prompt is one token with its fixed id.
    # They are set through the serialised form: the Python API would assign fresh ids.
    state = json.loads(tokenizer.to_str())
    state["added_tokens"] = [
        {
            "id": token_id,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for token_id, token in sorted(special_tokens.items())
    ]
    return Tokenizer.from_str(json.dumps(state))
