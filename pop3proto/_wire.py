"""Reading and writing single lines: status lines, response codes, command
lines. Parsing functions take bytes already checked for length and return
values or raise ``ValueError`` with a reason that never quotes the input."""

from __future__ import annotations

import re

from . import _events as ev
from ._codec import b64decode_strict, b64encode
from ._purecore import MAX_UID
from ._util import LocalProtocolError, decode_text, encode_text

#: RFC 1939 §3 / RFC 2449 §4: a response's first line is at most 512
#: octets with its CRLF.
MAX_STATUS_LINE = 512

_WS = b" \t"
# RFC 2449 §3: resp-level = 1*rchar, rchar = printable ASCII but "/" and "]".
_CODE_RE = re.compile(
    rb"\[([\x21-\x2e\x30-\x5c\x5e-\x7e]+(?:/[\x21-\x2e\x30-\x5c\x5e-\x7e]+)*)"
    rb"(?: ([\x20-\x5c\x5e-\x7e]{1,64}))?\]"
)
# RFC 4422 §3.1: mechanism names are 1-20 of A-Z, 0-9, "-" and "_".
_MECH_RE = re.compile(r"[A-Za-z0-9_-]{1,20}")


def parse_status(line: bytes) -> tuple[bool, bytes]:
    """Split a status line (line end removed) into (ok, rest). Accepts
    ``+OK``/``-ERR`` in any case followed by the end or white space (PROTOCOL
    §12.1); rejects ``+OKAY``, ``-ERRx``, ``+`` and anything else."""
    head = line[:4].upper()
    if head[:3] == b"+OK" and (len(line) == 3 or line[3] in _WS):
        return True, line[3:].lstrip(_WS)
    if head == b"-ERR" and (len(line) == 4 or line[4] in _WS):
        return False, line[4:].lstrip(_WS)
    raise ValueError("not a status line")


def split_code(rest: bytes) -> tuple[ev.ResponseCode | None, str]:
    """Take a leading ``[CODE/SUB]`` off a status text."""
    if rest[:1] == b"[":
        m = _CODE_RE.match(rest)
        if m:
            code = ev.ResponseCode(
                tuple(level.decode("ascii").upper() for level in m.group(1).split(b"/")),
                m.group(2).decode("ascii") if m.group(2) is not None else None,
            )
            return code, decode_text(rest[m.end() :].lstrip(_WS))
    return None, decode_text(rest)


def check_text(text: str, what: str) -> bytes:
    """Encode text for the wire, refusing CR, LF and NUL (HARDENING 11, 20)."""
    data = encode_text(text)
    if b"\r" in data or b"\n" in data or b"\0" in data:
        raise LocalProtocolError(f"{what} contains CR, LF or NUL")
    return data


def format_status(ok: bool, text: str, code: ev.ResponseCode | None) -> bytes:
    """A status line with its CRLF, at most 512 octets (RFC 2449 §4)."""
    parts = [b"+OK" if ok else b"-ERR"]
    if code is not None:
        levels = "/".join(code.levels)
        inner = f"{levels} {code.argument}" if code.argument is not None else levels
        raw = check_text(inner, "response code")
        if not _CODE_RE.fullmatch(b"[" + raw + b"]"):
            raise LocalProtocolError("invalid response code")
        parts.append(b"[" + raw + b"]")
    if text:
        parts.append(check_text(text, "reply text"))
    line = b" ".join(parts) + b"\r\n"
    if len(line) > MAX_STATUS_LINE:
        raise LocalProtocolError("status line longer than 512 octets")
    return line


def parse_listing_number(token: bytes) -> int:
    """A decimal number in a reply (tolerant: leading zeros allowed, at most 19
    digits, at most 2**63-1; no sign, no exponent, no hex)."""
    if not token.isdigit() or not token.isascii() or len(token) > 19:
        raise ValueError("not a decimal number")
    value = int(token)
    if value >= 1 << 63:
        raise ValueError("number too large")
    return value


#: The octets a unique-id may hold (RFC 1939 §7: 0x21-0x7E).
_UID_OCTETS = bytes(range(0x21, 0x7F))


def check_uid(uid: str | bytes) -> bytes:
    """RFC 1939 §7: a unique-id is 1-70 octets of 0x21-0x7E (a ``str`` with
    anything outside ASCII is refused, never approximated)."""
    if isinstance(uid, str):
        if not uid.isascii():
            raise ValueError("invalid unique-id")
        raw = uid.encode("ascii")
    else:
        raw = bytes(uid)
    # What is left once every allowed octet is deleted must be nothing.
    if not 1 <= len(raw) <= MAX_UID or raw.translate(None, _UID_OCTETS):
        raise ValueError("invalid unique-id")
    return raw


# ------------------------------------------------------------------ commands

_NO_ARGS = {
    "STLS": ev.Stls,
    "CAPA": ev.Capa,
    "STAT": ev.Stat,
    "NOOP": ev.Noop,
    "RSET": ev.Rset,
    "QUIT": ev.Quit,
    "UTF8": ev.Utf8,
}


def parse_msg_number(token: str, *, zero: bool = False) -> int:
    """A message number (or TOP line count when ``zero``) in a command:
    strict decimal, no leading zeros, no sign, at most 2**31-1 (HARDENING 15)."""
    if not token or not token.isascii() or not token.isdigit() or len(token) > 10:
        raise ValueError("invalid number")
    if token[0] == "0" and (len(token) > 1 or not zero):
        raise ValueError("invalid number")
    value = int(token)
    if value > 0x7FFFFFFF:
        raise ValueError("number out of range")
    return value


#: The octets a command line may not hold: controls but TAB, and DEL.
_CONTROL_OCTETS = bytes(range(0x20)).replace(b"\t", b"") + b"\x7f"


def parse_command(line: bytes, extensions: dict[str, bool]) -> ev.Command:
    """Parse one command line (line end removed). Raises ``ValueError`` with a
    safe reason for anything malformed or unknown."""
    if line.translate(None, _CONTROL_OCTETS) != line:
        raise ValueError("control characters in command")
    keyword_raw, sp, rest_raw = line.partition(b" ")
    if not 1 <= len(keyword_raw) <= 32 or not keyword_raw.isascii():
        raise ValueError("unknown command")
    keyword = keyword_raw.decode("ascii").upper().rstrip("\t")
    if keyword == "PASS":
        if not sp:
            raise ValueError("PASS needs an argument")
        # RFC 1939 §7: the password is the rest of the line, spaces included.
        return ev.Pass(decode_text(rest_raw))
    rest = decode_text(rest_raw)
    args = rest.split()
    if keyword in _NO_ARGS:
        if args:
            raise ValueError("no arguments expected")
        return _NO_ARGS[keyword]()
    if keyword == "USER":
        if len(args) != 1:
            raise ValueError("USER needs one argument")
        return ev.User(args[0])
    if keyword == "APOP":
        if len(args) != 2:
            raise ValueError("APOP needs two arguments")
        return ev.Apop(args[0], args[1])
    if keyword in ("LIST", "UIDL"):
        if len(args) > 1:
            raise ValueError("too many arguments")
        msg = parse_msg_number(args[0]) if args else None
        return ev.List(msg) if keyword == "LIST" else ev.Uidl(msg)
    if keyword in ("RETR", "DELE"):
        if len(args) != 1:
            raise ValueError("one message number expected")
        n = parse_msg_number(args[0])
        return ev.Retr(n) if keyword == "RETR" else ev.Dele(n)
    if keyword == "TOP":
        if len(args) != 2:
            raise ValueError("TOP needs a message number and a line count")
        return ev.Top(parse_msg_number(args[0]), parse_msg_number(args[1], zero=True))
    if keyword == "AUTH":
        if not args:
            return ev.Auth("")
        if len(args) > 2 or not _MECH_RE.fullmatch(args[0]):
            raise ValueError("invalid AUTH arguments")
        ir: bytes | None = None
        if len(args) == 2:
            try:
                ir = b"" if args[1] == "=" else b64decode_strict(args[1].encode("ascii", "replace"))
            except ValueError:
                raise ValueError("invalid base64 in the initial response") from None
        return ev.Auth(args[0].upper(), ir)
    if keyword == "LANG":
        if len(args) > 1:
            raise ValueError("too many arguments")
        return ev.Lang(args[0] if args else None)
    if keyword in extensions:
        return ev.ExtensionCommand(keyword, tuple(args), extensions[keyword])
    raise ValueError("unknown command")


def _arg(value: str, what: str, *, spaces: bool = False) -> bytes:
    data = check_text(value, what)
    if not spaces and (b" " in data or b"\t" in data or not data):
        raise LocalProtocolError(f"{what} must be one non-empty word")
    if any(b < 0x20 for b in data) or b"\x7f" in data:
        raise LocalProtocolError(f"{what} contains control characters")
    return data


def format_command(cmd: ev.Command) -> bytes:
    """Serialise a command with its CRLF; raises ``LocalProtocolError`` for
    anything that cannot be sent safely (HARDENING 11)."""
    kind = type(cmd)
    if isinstance(cmd, ev.User):
        return b"USER " + _arg(cmd.name, "user name") + b"\r\n"
    if isinstance(cmd, ev.Pass):
        return b"PASS " + _arg(cmd.password, "password", spaces=True) + b"\r\n"
    if isinstance(cmd, ev.Apop):
        digest = _arg(cmd.digest, "APOP digest")
        return b"APOP " + _arg(cmd.name, "user name") + b" " + digest + b"\r\n"
    if isinstance(cmd, ev.Auth):
        if not cmd.mechanism:
            if cmd.initial_response is not None:
                raise LocalProtocolError("bare AUTH takes no initial response")
            return b"AUTH\r\n"
        if not _MECH_RE.fullmatch(cmd.mechanism):
            raise LocalProtocolError("invalid SASL mechanism name")
        line = b"AUTH " + cmd.mechanism.upper().encode("ascii")
        if cmd.initial_response is not None:
            ir = b64encode(cmd.initial_response) if cmd.initial_response else b"="
            line += b" " + ir
        return line + b"\r\n"
    if isinstance(cmd, ev.AuthResponse):
        return b64encode(cmd.data) + b"\r\n"
    if isinstance(cmd, ev.AuthCancel):
        return b"*\r\n"
    if isinstance(cmd, (ev.List, ev.Uidl)):
        if cmd.msg is None:
            return cmd.keyword.encode() + b"\r\n"
        return b"%s %d\r\n" % (cmd.keyword.encode(), _msg(cmd.msg))
    if isinstance(cmd, (ev.Retr, ev.Dele)):
        return b"%s %d\r\n" % (cmd.keyword.encode(), _msg(cmd.msg))
    if isinstance(cmd, ev.Top):
        if not isinstance(cmd.lines, int) or cmd.lines < 0:
            raise LocalProtocolError("TOP line count must be a non-negative integer")
        return b"TOP %d %d\r\n" % (_msg(cmd.msg), cmd.lines)
    if isinstance(cmd, ev.Lang):
        if cmd.tag is None:
            return b"LANG\r\n"
        return b"LANG " + _arg(cmd.tag, "language tag") + b"\r\n"
    if isinstance(cmd, ev.ExtensionCommand):
        kw = _arg(cmd.keyword, "keyword")
        parts = [kw.upper()] + [_arg(a, "argument") for a in cmd.args]
        return b" ".join(parts) + b"\r\n"
    if kind in _NO_ARGS.values():
        return cmd.keyword.encode() + b"\r\n"
    raise LocalProtocolError(f"{kind.__name__} is not a command")


def _msg(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 0x7FFFFFFF:
        raise LocalProtocolError("message numbers are integers from 1 to 2**31-1")
    return n
