#pragma once

#include "../prefix_attn_params.h"

namespace prefix_attn::cpu {

// Forward: writes params.out and params.lse.
void forward(const FwdParams& params);

// Backward: writes the gradients whose need_* flag is set, and nothing else.
void backward(const BwdParams& params);

}  // namespace prefix_attn::cpu
