"""What the fuzz tests' strings are drawn from: any character but a surrogate code point,
which no real input carries (protobuf cannot serialise one, nor UTF-8 encode it)."""

from __future__ import annotations

from typing import Literal

from hypothesis import strategies as st

SURROGATES: tuple[Literal["Cs"]] = ("Cs",)  # typed: a bare tuple literal infers tuple[str]
CHARS = st.characters(blacklist_categories=SURROGATES)
