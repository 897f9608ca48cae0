"""What the families' tiny-model kits share: a small word-level tokenizer and the fp8 file layout.

Each family builds its own tiny model (``Family.tiny``) and writes it in the layouts users have
(``Family.write_tiny``); tests and the demo use them through the family contract.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

WORDS = tuple("""
    a an the of on in with and photo picture image painting drawing style portrait of red green blue
    yellow orange purple pink white black grey gray brown pale dark light bright circle square
    triangle star shape shapes background large small big tiny centered simple flat colour color cat
    dog person man woman girl boy house tree sky sea mountain city street flower car night day sun
    moon is are one two three
""".split())
SPECIAL = ["<pad>", "</s>", "<unk>", "<s>"]


def make_tokenizer(extra_words: tuple[str, ...], max_length: int, add_bos: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small English vocabulary (lower-cased, punctuation split off)."""
    words = list(dict.fromkeys([*WORDS, *(w.lower() for w in extra_words), ",", ".", "-", "_"]))
    vocab = {tok: i for i, tok in enumerate(SPECIAL + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = "<s> $A </s>" if add_bos else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>", bos_token="<s>")


def to_fp8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Matrices in float8_e4m3fn, vectors in bf16: the layout of ComfyUI/Kijai fp8 checkpoints."""
    return {k: v.to(torch.float8_e4m3fn) if v.dim() >= 2 else v.to(torch.bfloat16) for k, v in sd.items()}
