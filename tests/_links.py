"""A stand-in link for tests that drive a SplitServer directly, frame by frame."""

from hosl.boundary import Frame, Kind
from hosl.transport import LinkError


class ScriptedLink:
    """A link whose peer sends `frames` in order, then nothing (LinkError); what the server sends,
    and the ERROR it fails with, are kept in `sent`."""

    max_frame_bytes = 0

    def __init__(self, frames=()):
        self.frames, self.sent = list(frames), []

    def recv(self):
        if not self.frames:
            raise LinkError("the script has no more frames")
        return self.frames.pop(0)

    def send(self, frame):
        self.sent.append(frame)

    def fail(self, message):
        self.sent.append(Frame(Kind.ERROR, meta={"message": message}))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
