"""`python -m hosl.token FILE`: a new shared secret for --auth-token-file, written to FILE with
mode 0600 (readable by its owner only); `python -m hosl.token -` prints it instead, for
$HOSL_AUTH_TOKEN. The secret is 32 random bytes from the operating system, as 64 hex digits. An
existing FILE is never overwritten. Copy the file to the other side over a channel you trust."""

from __future__ import annotations

import os
import sys

from hosl.auth import new_token

USAGE = "usage: python -m hosl.token FILE   (or - to print the token)"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or (argv[0].startswith("-") and argv[0] != "-"):
        print(USAGE, file=sys.stderr)
        return 2
    token = new_token()
    if argv[0] == "-":
        print(token)
        return 0
    try:
        fd = os.open(argv[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"error: {argv[0]} exists; a token file is never overwritten (remove it first)", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot create {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 2
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    print(f"wrote a new token to {argv[0]} (mode 0600); give both sides --auth-token-file with a copy of it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
