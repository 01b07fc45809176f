"""The engine's limits: every buffer and count the peer controls is bounded.

A limit that is hit raises ``LimitExceeded`` naming the attribute below.
"""

from __future__ import annotations

import attrs

__all__ = ["Limits"]


def _positive(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer")


@attrs.frozen(kw_only=True)
class Limits:
    """Configurable limits (all enforced, all tested). The defaults are generous
    enough for real servers and clients, and never unbounded."""

    #: Longest command line (server input) or status, CAPA, listing or
    #: language line (client input), CRLF included. RFC 1939/2449 need 255
    #: and 512; real peers send longer.
    max_line: int = attrs.field(default=8192, validator=_positive)
    #: Longest SASL line: an ``AUTH`` command with its initial response, a
    #: challenge or an answer (RFC 5034 §4 sets no limit; OAuth tokens are long).
    max_sasl_line: int = attrs.field(default=65536, validator=_positive)
    #: Most capability lines in a CAPA reply.
    max_capa_lines: int = attrs.field(default=256, validator=_positive)
    #: Most entries in a LIST or UIDL listing.
    max_listing_entries: int = attrs.field(default=1_000_000, validator=_positive)
    #: Most commands a client keeps outstanding (pipelining depth).
    max_pipeline: int = attrs.field(default=64, validator=_positive)
    #: Most bytes held in the receive buffer before an event can be made.
    max_buffer: int = attrs.field(default=4 * 1024 * 1024, validator=_positive)
    #: Largest message body (octets after un-stuffing) a client accepts.
    max_message_size: int = attrs.field(default=1 << 32, validator=_positive)
    #: Most SASL challenge rounds in one AUTH exchange.
    max_auth_rounds: int = attrs.field(default=32, validator=_positive)
    #: Bad commands tolerated before login; the next one ends the session.
    max_bad_commands_before_login: int = attrs.field(default=3, validator=_positive)
    #: Bad commands tolerated after login.
    max_bad_commands: int = attrs.field(default=20, validator=_positive)
