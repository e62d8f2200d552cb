"""Triton kernels of hosl, installed as hosl.kernels (setup maps the source folder kernels/ there).

Importing this package imports Triton. On a machine without a GPU, Triton runs kernels only through
its interpreter, which it reads from TRITON_INTERPRET=1 when it is first imported.
"""

from hosl.kernels.noise import add_noise_, add_noise_rows_, gaussian_

__all__ = ["add_noise_", "add_noise_rows_", "gaussian_"]
