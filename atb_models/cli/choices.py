"""The values --device and --dtype accept, in a module without torch so that a parser can list them at once."""

DEVICE_CHOICES = ("auto", "npu", "cuda", "cpu")
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
