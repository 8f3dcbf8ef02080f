"""Text generation: decoding strategies (decoding.py) and CoCa captioning / VQA prompts (captioning.py)."""

from .captioning import check_generative, generate, vqa_prompt, vqa_text
from .decoding import STRATEGIES, GenerationConfig, beam_search, decode

__all__ = ["STRATEGIES", "GenerationConfig", "beam_search", "check_generative", "decode", "generate",
           "vqa_prompt", "vqa_text"]
