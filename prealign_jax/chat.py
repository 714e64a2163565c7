"""The chat template, defined once: OpenAI-style messages as the corpus's tagged text.

    system     ->  its text as the document's opening (plain, untagged) text, then a newline
    user       ->  <human>text</human>, then a newline
    assistant  ->  <ai>text</ai>, then a newline

and generation opens `<ai>`. Every message's text goes through `tags.escape`, so no client
text can become a tag token. A system message may only come first (later, it would be
untagged text in the middle of the conversation, which the corpus never has). The messages
are context: the policy governs the document the model writes from the opening `<ai>` on,
as for `sampling.make_prompt(mode="ai")`, whose user turn is this template's.
"""

from __future__ import annotations

from typing import Sequence

from prealign_jax import tags, vocab as vocab_lib
from prealign_jax.errors import UserError

ROLES = ("system", "user", "assistant")
ROLE_MODES = {"user": "human", "assistant": "ai"}
OPENER = "<ai>"  # what generation starts with: the assistant's span
CLOSER = "</ai>"  # ends the assistant's turn
REDACTED = "[redacted]"  # a redaction in message content


class ChatError(UserError):
    """Messages the template cannot render (names the message and what to do)."""


def render(messages: Sequence[tuple[str, str]]) -> str:
    """The tagged context of `(role, text)` messages (without the opener)."""
    parts = []
    for i, (role, text) in enumerate(messages):
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role={role!r}: must be one of {', '.join(ROLES)}")
        if role == "system" and i:
            raise ChatError(f"messages[{i}]: a system message may only come first")
        body = tags.escape(text)
        mode = ROLE_MODES.get(role)
        parts.append(f"<{mode}>{body}</{mode}>\n" if mode else body + "\n")
    return "".join(parts)


def content(vocab, ids) -> str:
    """A generated turn as message content: its plain text, tags dropped except a
    redaction, shown as REDACTED (the modes of the tokens and the tagged text are in the
    response's `prealign` field)."""
    return vocab_lib.decode_tagged(vocab, ids, plain={"<redacted/>": REDACTED})
