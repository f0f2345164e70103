"""The independent reader of ModelOpt-HF exports lives in the package (hybridquant.readers.modelopt)."""

from hybridquant.readers import build_model  # noqa: F401
from hybridquant.readers.modelopt import (E2M1, SCALE_SUFFIXES, dequantize, excluded,  # noqa: F401
                                          read_tensors, unpack_e2m1)
