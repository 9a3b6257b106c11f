"""The tiny tokenizer: byte-level BPE trained with ``tokenizers`` on the generated preference data."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay lazy: the data side needs neither torch nor transformers
    from transformers import PreTrainedTokenizerFast

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<bos>", "<eos>", "<pad>", "<unk>"
# Order fixes the ids: <pad>=0, <bos>=1, <eos>=2, <unk>=3.
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]

# hh-rlhf style chat template, so that chat-style callers render the same format
# the models are trained on (plain-string DPO data never uses it).
HH_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '\n\nHuman: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\n\nAssistant: ' + message['content'] }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)


def train_tokenizer(texts: list[str] | Iterator[str], vocab_size: int = 1024,
                    model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained with ``tokenizers``; ``<bos>/<eos>/<pad>/<unk>`` are ids 1/2/0/3.

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
        special_tokens=SPECIAL_TOKENS,
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
    )
    fast.chat_template = HH_CHAT_TEMPLATE
    return fast
