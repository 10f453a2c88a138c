"""veil's wire format: msgpack with an explicit registry of types.

Nothing here runs code chosen by the sender: tensors travel as dtype, shape and raw
little-endian bytes, messages as a registered integer code plus their fields, and every
decoded value is checked before it is returned. Decoding bytes that are not a valid encoding
raises :class:`veil.SerializationError` and nothing else.
"""

from veil.serde._codec import DTYPES, MAX_NDIM, decode, encode, register_message
from veil.serde._refs import GradRef, Ref

__all__ = ["DTYPES", "MAX_NDIM", "GradRef", "Ref", "decode", "encode", "register_message"]
