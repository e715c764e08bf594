"""Word-level tokenizers built offline from a list of texts, for text encoders trained from scratch when no Hub
tokenizer can be downloaded, and the vocabulary of the synthetic benchmark's captions.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ran_peft.data import synthetic_caption_texts

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
BOS_TOKEN = "[BOS]"
EOS_TOKEN = "[EOS]"
# Order fixes the ids: [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3. EOS is deliberately not 2: CLIP's text model treats
# `eos_token_id == 2` as a legacy config and pools at the largest token id instead of at the EOS token.
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Whitespace, then every punctuation mark on its own, then digit runs apart from letters ("12mm" -> "12", "mm").
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation("isolated"),
            pre_tokenizers.Digits(False),
        ]
    )


def split_words(text: str) -> list[str]:
    """The words `text` becomes under the tokenizers `build_word_tokenizer` makes (lowercased, punctuation apart)."""
    normalized = _normalizer().normalize_str(text)
    return [word for word, _ in _pre_tokenizer().pre_tokenize_str(normalized)]


def build_word_tokenizer(
    texts: Iterable[str], *, vocab_size: int | None = None, max_length: int = 32, min_frequency: int = 1
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is the words of `texts`.

    Lowercases, splits on whitespace and isolates each punctuation mark and digit run; unknown words become
    `[UNK]`. Every encoded sequence is `[BOS] words... [EOS]` (the EOS survives truncation to `max_length`);
    padding is on the right with `[PAD]` (id 0). Ids: `[PAD]`=0, `[UNK]`=1, `[BOS]`=2, `[EOS]`=3, then words by
    decreasing frequency.

    For a CLIP text model: CLIP pools the text at the first EOS token, found by `CLIPTextConfig.eos_token_id`,
    whose default (49407) is the OpenAI tokenizer's. Whoever builds the model must set
    `eos_token_id=tokenizer.eos_token_id`, `bos_token_id`, `pad_token_id` likewise, `vocab_size >= len(tokenizer)`
    and `max_position_embeddings >= max_length`; otherwise the text is pooled at the wrong position, silently.

    Args:
        texts: the corpus, e.g. the training captions or `synthetic_vocabulary()`.
        vocab_size: at most this many entries, special tokens included; default: every word of `texts`.
        max_length: the tokenizer's `model_max_length` (special tokens included).
        min_frequency: words seen fewer times are left out of the vocabulary.
    """
    if isinstance(texts, str):
        raise ValueError("texts must be an iterable of strings, got a single str; wrap it in a list.")
    texts = list(texts)
    if not texts:
        raise ValueError(
            "texts is empty: a word-level tokenizer needs at least one text to learn its vocabulary."
        )
    if vocab_size is not None and vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must be > {len(SPECIAL_TOKENS)} (the special tokens) or None."
        )
    if max_length < 3:
        raise ValueError(f"max_length={max_length} is too small: it must be >= 3 ([BOS], one word, [EOS]).")
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency} is not allowed: it must be >= 1.")

    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tokenizer.normalizer = _normalizer()
    tokenizer.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.WordLevelTrainer(
        # The trainer needs an int; an upper bound larger than any corpus means "keep every word".
        vocab_size=vocab_size if vocab_size is not None else 2**31 - 1,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id, eos_id = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B:1 {EOS_TOKEN}:1",
        special_tokens=[(BOS_TOKEN, bos_id), (EOS_TOKEN, eos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )


def synthetic_vocabulary() -> list[str]:
    """Every word the synthetic benchmark (`ran_peft.data.synthetic_medical_dataset`) can write in a caption.

    Sorted and split as `split_words` splits, so `build_word_tokenizer(synthetic_vocabulary())` encodes every
    synthetic caption without `[UNK]`.
    """
    words: set[str] = set()
    for text in synthetic_caption_texts():
        words.update(split_words(text))
    return sorted(words)
