"""The one table of torch dtypes by name: the names configs ([coefficients] dtype, [export]
dtype, [gap] dtype, [teacher] dtype), a jumper's meta.json and its payload digest use."""

import torch

#: name -> torch dtype
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
          "uint8": torch.uint8, "int8": torch.int8, "bool": torch.bool}
#: torch dtype -> name
NAMES = {dtype: name for name, dtype in DTYPES.items()}
#: the dtypes a jumper (its parameters and activations) may have
JUMPER = ("float32", "float64")
