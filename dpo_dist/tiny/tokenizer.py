"""The tiny tokenizer: byte-level BPE trained with ``tokenizers`` on the generated preference data."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from dpo_dist.data.chat_templates import HH_TEMPLATE, TEMPLATE_TOKENS

if TYPE_CHECKING:  # heavy imports stay lazy: the data side needs neither torch nor transformers
    from transformers import PreTrainedTokenizerFast

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<bos>", "<eos>", "<pad>", "<unk>"
# Order fixes the ids: <pad>=0, <bos>=1, <eos>=2, <unk>=3.
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]

# hh-rlhf style chat template of the shared tokenizer folder, so that chat-style callers render the format the
# hh data is written in. The model folders carry their family's template instead (dpo_dist.tiny.assets).
HH_CHAT_TEMPLATE = HH_TEMPLATE
# The turn markers of the Llama-3-like and Gemma-3-like templates, reserved as special tokens (ids 4..8, after
# <pad>/<bos>/<eos>/<unk>) so that each is one token, as in the real vocabularies.
CHAT_TOKENS = (*TEMPLATE_TOKENS["llama3"], *TEMPLATE_TOKENS["gemma3"])


def train_tokenizer(texts: list[str] | Iterator[str], vocab_size: int = 1024,
                    model_max_length: int = 1024, chat_tokens: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained with ``tokenizers``; ``<bos>/<eos>/<pad>/<unk>`` are ids 1/2/0/3, then
    ``chat_tokens`` (special: one token each, skipped when decoding with ``skip_special_tokens``).

    No special token is added automatically (TRL tokenizes DPO prompts with
    ``add_special_tokens=False`` and appends ``<eos>`` itself); decoding is byte-exact.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # deferred: tokenizers
    from transformers import PreTrainedTokenizerFast  # deferred: transformers

    tok = Tokenizer(models.BPE())  # byte-level: every byte is in the vocab, so no unk is ever produced
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[*SPECIAL_TOKENS, *chat_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids: generate() rejects them
        **({"additional_special_tokens": list(chat_tokens)} if chat_tokens else {}),
    )
    fast.chat_template = HH_CHAT_TEMPLATE
    return fast
