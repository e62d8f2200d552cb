"""`python -m hosl`: what this installation of hosl can do here."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception as exc:  # report any failure to import, whatever it is
        return f"not importable ({type(exc).__name__}: {exc})"
    return getattr(module, "__version__", "unknown version")


def report() -> str:
    import torch

    import hosl
    from hosl import _ext, noise

    lines = [
        f"hosl {hosl.__version__} at {os.path.dirname(hosl.__file__)}",
        f"python {platform.python_version()} ({sys.executable}) on {platform.platform()}",
        f"torch {torch.__version__}, triton {_version('triton')}, numpy {_version('numpy')}, "
        f"transformers {_version('transformers')}",
        "hosl._C: "
        + ("loaded from " + _ext._C.__file__ if _ext._C is not None else f"NOT loaded ({_ext.load_error})"),
        f"cpu threads: {torch.get_num_threads()} (torch.get_num_threads)",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}, "
        f"HOSL_NOISE_BACKEND={os.environ.get('HOSL_NOISE_BACKEND', '')!r}",
    ]
    import torch.distributed as dist

    gloo = dist.is_available() and dist.is_gloo_available()
    lines.append(
        "transports: local "
        + ("usable" if _ext._C is not None else "unusable (needs hosl._C)")
        + ", dist "
        + ("usable (gloo)" if gloo else "unusable (this torch has no gloo backend)")
        + ", grpc "
        + ("usable" if importlib.util.find_spec("grpc") else "unusable (pip install 'hosl[grpc]')")
    )
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        for i in range(torch.cuda.device_count()):
            lines.append(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        lines.append("cuda: not available")
    for device in devices:
        lines.append(f"noise backends on {device}:")
        for name, why_not in noise.available_backends(device).items():
            lines.append(f"  {name:7s}" + ("usable" if why_not is None else f"unusable: {why_not}"))
        try:
            lines.append(f"  default: {noise.resolve_backend(None, device)}")
        except (ValueError, noise.BackendUnavailableError) as exc:
            lines.append(f"  default: none ({exc})")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        print("usage: python -m hosl\n\n" + __doc__.strip() + "\nThe trainer: python -m hosl.train --help")
        return 0
    if argv:
        print("usage: python -m hosl (no arguments; see --help)", file=sys.stderr)
        return 2
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
