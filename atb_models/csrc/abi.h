// The version of the C interface both libraries (cpu_kernels.cpp, cpu_kernels_avx2.cpp) report in atb_native_abi(),
// checked at load against kernels/native.py's ABI_VERSION: raise both whenever a signature or a struct changes.

#pragma once

#define ATB_ABI_VERSION 14
