"""Text tokenizers: a sentencepiece wrapper and open_clip's BPE tokenizer, behind one interface."""

from .tokenizer import OpenClipBPETokenizer, SentencePieceTokenizer, get_tokenizer, train_sentencepiece

__all__ = ["SentencePieceTokenizer", "OpenClipBPETokenizer", "get_tokenizer", "train_sentencepiece"]
