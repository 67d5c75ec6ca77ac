// cuda_emul stand-in for <cuda.h>.
#pragma once

#include <cuda_emul.h>
