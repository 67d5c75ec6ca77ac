// cuda_emul stand-in for <cuda_runtime.h>.
#pragma once

#include <cuda_emul.h>
