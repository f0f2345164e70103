"""The independent reader of exported checkpoints lives in the package (hybridquant.exported)."""

from hybridquant.exported import (E2M1, SCALE_SUFFIXES, build_model, dequantize, excluded,  # noqa: F401
                                  read_tensors, unpack_e2m1)
