"""Text decoders that write text about a context of image tokens."""

from .transformer_decoder import TextDecoderConfig, TransformerTextDecoder, text_decoder

__all__ = ["TextDecoderConfig", "TransformerTextDecoder", "text_decoder"]
