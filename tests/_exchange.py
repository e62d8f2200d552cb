"""One client-server exchange over a hosl link, run as a program: the client embeds a batch with the
first blocks of a tiny model, sends the activation up, the server returns the loss. The result is
printed as JSON (and written to OUT_DIR/<role>.json if given); a link failure prints one line to stderr and exits 3.

    python tests/_exchange.py MODE TRANSPORT [TIMEOUT [OUT_DIR]]   (dist: RANK etc. in the environment)

MODE: exchange (the whole round trip), client-dies (the client says hello, then waits to be killed),
client-silent (the client says hello, then sleeps past the server's timeout), rogue-length (dist
only: after hello the client sends a length prefix of 2^40 bytes, as a hostile peer would),
rogue-tamper / rogue-replay (dist with $HOSL_AUTH_TOKEN: after hello the client sends a frame with a
byte changed after its MAC was computed, or the same frame and MAC twice), stream (dist only:
the client streams STREAM_ROUNDS rounds of STREAM_FRAMES 1-MiB frames before reading the answers
and reports the most bytes its link held in unfinished sends).
"""

import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_models import batch, model  # noqa: E402

from hosl.auth import read_secret  # noqa: E402
from hosl.boundary import Frame, Kind, encode_frame  # noqa: E402
from hosl.split import Activation, split_model  # noqa: E402
from hosl.transport import LinkError, dist_link, local_links  # noqa: E402

K = 2


def sides():
    return split_model(model("llama"), K)


def client_side(link, mode, client):
    ids, mask, labels = batch()
    if mode == "stream":
        return stream_client(link)
    link.send(Frame(Kind.HELLO, meta={"mode": mode}))
    if mode == "client-dies":
        print("ready", flush=True)
        time.sleep(3600)
    if mode == "rogue-length":
        import torch.distributed as dist

        dist.send(torch.tensor([1 << 40], dtype=torch.int64), dst=0)
        time.sleep(2)  # the server must refuse it at once, without waiting for 1 TiB to arrive
        return {}
    if mode in ("rogue-tamper", "rogue-replay"):  # an authenticated peer's frames, edited or sent twice
        buf = encode_frame(Frame(Kind.ACT, step=7, tensors={"x": torch.ones(4)}))
        tag = link._mac.tag(buf.numpy())
        if mode == "rogue-tamper":
            buf = buf.clone()
            buf[-1] ^= 1
        else:
            link._post([torch.tensor([buf.numel()]), buf, torch.frombuffer(bytearray(tag), dtype=torch.uint8)])
        link._post([torch.tensor([buf.numel()]), buf, torch.frombuffer(bytearray(tag), dtype=torch.uint8)])
        time.sleep(2)
        return {}
    if mode == "client-silent":
        time.sleep(2 * link.timeout + 5)
        return {}
    with torch.no_grad():
        h = client(input_ids=ids, attention_mask=mask)
    link.send(Frame(Kind.ACT, step=7, tensors={**h.tensors(), "labels": labels}))
    reply = link.recv()
    assert reply.kind == Kind.LOSS and reply.step == 7
    return {"loss": reply.tensors["loss"].item(), **{"client_" + k: v for k, v in link.stats().items()}}


STREAM_ROUNDS, STREAM_FRAMES = 3, 24


def stream_client(link):
    link.send(Frame(Kind.HELLO, meta={"mode": "stream"}))
    held, answers = [], []
    for r in range(STREAM_ROUNDS):
        for i in range(STREAM_FRAMES):
            link.send(Frame(Kind.ACT, step=r, probe=i, tensors={"hidden": torch.full((1 << 18,), float(i))}))
            held.append(link.held_bytes)
        for _ in range(STREAM_FRAMES):
            reply = link.recv()
            answers.append([reply.step, reply.probe, reply.tensors["loss"].item()])
    return {"held": held, "answers": answers}


def stream_server(link):
    for _ in range(STREAM_ROUNDS * STREAM_FRAMES):
        frame = link.recv()
        value = frame.tensors["hidden"][0].reshape(1)
        link.send(Frame(Kind.LOSS, step=frame.step, probe=frame.probe, tensors={"loss": value}))
    return {}


def server_side(link, server):
    link.max_frame_bytes = 2 << 20  # this session's largest frame: a stream frame is 1 MiB
    hello = link.recv()
    assert hello.kind == Kind.HELLO
    if hello.meta.get("mode") == "stream":
        return stream_server(link)
    if hello.meta.get("mode", "").startswith("rogue"):
        while True:  # until a frame is refused
            link.recv()
    frame = link.recv()
    labels = frame.tensors.pop("labels")
    with torch.no_grad():
        loss = server(Activation.from_tensors(frame.tensors), labels=labels).loss
    link.send(Frame(Kind.LOSS, step=frame.step, tensors={"loss": loss}))
    return {"server_" + k: v for k, v in link.stats().items()}


def main():
    mode, transport = sys.argv[1], sys.argv[2]
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 60.0
    try:
        if transport == "local":
            client_link, server_link = local_links(slots=2, slot_bytes=1 << 20, timeout=timeout)
            client, server = sides()  # built once: two threads seeding one generator would race
            result = {}
            thread = threading.Thread(target=lambda: result.update(server_side(server_link, server)))
            thread.start()
            result.update(client_side(client_link, mode, client))
            thread.join()
        else:
            link = dist_link(timeout=timeout, secret=read_secret(None))  # $HOSL_AUTH_TOKEN
            client, server = sides()  # each process builds the same model and keeps its side
            result = client_side(link, mode, client) if link.role == "client" else server_side(link, server)
            result["role"] = link.role
            link.close()
    except LinkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)
    print(json.dumps(result))
    if len(sys.argv) > 4:
        (Path(sys.argv[4]) / f"{result.get('role', 'local')}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
