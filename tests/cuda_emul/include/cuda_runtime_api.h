// cuda_emul stand-in for <cuda_runtime_api.h>.
#pragma once

#include <cuda_emul.h>
