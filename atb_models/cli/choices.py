"""The values --device, --dtype and --quantize accept, in a module without torch so that a parser can list them at
once (atb_models.quantization takes its methods from here)."""

DEVICE_CHOICES = ("auto", "npu", "cuda", "cpu")
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
QUANTIZE_CHOICES = ("w8a16",)
# How the quantize tool rounds: round-to-nearest (data-free, as quantize-at-load does) or calibrated GPTQ.
QUANT_ALGORITHM_CHOICES = ("rtn", "gptq")
