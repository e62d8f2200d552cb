"""Peers that prove they may speak: a shared secret, a challenge-response when a dist link opens, and
a MAC on every frame after it, checked before the frame is decoded.

    secret = read_secret(path)           # --auth-token-file, else $HOSL_AUTH_TOKEN; None: no auth
    python -m hosl.token FILE            # a new secret (32 random bytes, as hex) in FILE, mode 0600

The handshake (hosl.transport's dist link runs it before any frame):

    each side  -> HELLO_MAGIC + its role byte + a fresh 32-byte nonce
    each side  -> proof = HMAC-SHA256(secret, "proof" | its role | client nonce | server nonce)
    both       session key = HMAC-SHA256(secret, "session" | client nonce | server nonce)

Each side checks the other's proof (hmac.compare_digest) before it sends or accepts a frame; a peer
without the secret cannot make one, and one recorded from an earlier session does not match the
fresh nonces. Every frame then carries tag = HMAC-SHA256(session key, sender role | frame counter |
frame bytes): a tampered frame, a frame of another session and a frame replayed or reordered within
this one (the counter) are refused before a byte of them is decoded.

What this gives: authenticity and integrity of every frame. What it does not: confidentiality (the
activations, labels and losses cross in the clear over gloo; use a tunnel such as SSH or WireGuard
on an untrusted network), and no protection of the rendezvous store itself, which torch.distributed
runs unauthenticated on MASTER_PORT: a stranger can occupy the client's rank and so stop the run
(it is refused at the handshake), never speak in it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
from pathlib import Path

ENV = "HOSL_AUTH_TOKEN"
HELLO_MAGIC = b"HAUT"  # not b"HOSL": a side without a secret recognises the handshake and says so
NONCE_BYTES = 32
TAG_BYTES = 32
HELLO_BYTES = len(HELLO_MAGIC) + 1 + NONCE_BYTES
_ROLE_BYTE = {"server": b"S", "client": b"C"}


class AuthError(ValueError):
    """A secret that cannot be read, or a peer that failed to prove it holds the secret."""


# A recorded handshake lets anyone guess the secret offline, fast (an HMAC a guess): a short one
# falls. 16 bytes is the least accepted; `python -m hosl.token` writes 32 random ones.
MIN_SECRET_BYTES = 16
TOKEN_BYTES = 32


def new_token() -> str:
    """A fresh secret: TOKEN_BYTES random bytes from the OS, as hex."""
    return secrets.token_hex(TOKEN_BYTES)


def read_secret(path: str | None) -> bytes | None:
    """The shared secret: the contents of `path` (surrounding whitespace removed), else the
    environment variable HOSL_AUTH_TOKEN; None when neither is given. Never a command-line value,
    which any user of the machine can read in `ps`. AuthError for a secret shorter than
    MIN_SECRET_BYTES."""
    if path:
        try:
            text = Path(path).read_bytes().strip()
        except OSError as exc:
            raise AuthError(f"cannot read --auth-token-file {path}: {exc.strerror}") from None
        if not text:
            raise AuthError(f"--auth-token-file {path} is empty")
        where = f"--auth-token-file {path}"
    else:
        text = os.environ.get(ENV, "").strip().encode()
        if not text:
            return None
        where = f"${ENV}"
    if len(text) < MIN_SECRET_BYTES:
        raise AuthError(
            f"{where} holds a secret of {len(text)} bytes, fewer than {MIN_SECRET_BYTES}: a recorded handshake "
            "would let it be guessed offline; make one with python -m hosl.token FILE"
        )
    return text


def hello(role: str) -> tuple[bytes, bytes]:
    """(this side's handshake message, its nonce)."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return HELLO_MAGIC + _ROLE_BYTE[role] + nonce, nonce


def peer_nonce(message: bytes, peer_role: str) -> bytes:
    """The nonce in the peer's handshake message; AuthError when it is not one from that role."""
    if len(message) != HELLO_BYTES or message[:4] != HELLO_MAGIC:
        raise AuthError(f"the {peer_role} did not authenticate (no shared secret on its side?)")
    if message[4:5] != _ROLE_BYTE[peer_role]:
        raise AuthError(f"the peer's handshake is not the {peer_role}'s")
    return message[5:]


def proof(secret: bytes, role: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(secret, b"proof" + _ROLE_BYTE[role] + client_nonce + server_nonce, hashlib.sha256).digest()


def proof_ok(got: bytes, secret: bytes, role: str, client_nonce: bytes, server_nonce: bytes) -> bool:
    """Whether `got` is `role`'s proof for these nonces (compared in constant time)."""
    return hmac.compare_digest(got, proof(secret, role, client_nonce, server_nonce))


def session_key(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(secret, b"session" + client_nonce + server_nonce, hashlib.sha256).digest()


class FrameMac:
    """Tags the frames one side sends and checks those it receives, each direction counted."""

    def __init__(self, key: bytes, role: str, peer: str):
        self._key = key
        self._mine, self._theirs = _ROLE_BYTE[role], _ROLE_BYTE[peer]
        self.sent = self.received = 0
        self.peer = peer

    def _tag(self, who: bytes, counter: int, data) -> bytes:
        h = hmac.new(self._key, who + struct.pack("<Q", counter), hashlib.sha256)
        h.update(data)  # hashlib releases the GIL for large buffers
        return h.digest()

    def tag(self, data) -> bytes:
        """The tag of the next frame this side sends."""
        tag = self._tag(self._mine, self.sent, data)
        self.sent += 1
        return tag

    def check(self, data, tag: bytes) -> None:
        """AuthError unless tag is the peer's next frame's."""
        want = self._tag(self._theirs, self.received, data)
        if not hmac.compare_digest(want, bytes(tag)):
            raise AuthError(
                f"frame {self.received} from the {self.peer} failed its MAC check (tampered, replayed, out of order "
                "or from another session); refused before decoding"
            )
        self.received += 1
