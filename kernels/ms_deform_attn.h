// Multi-scale deformable attention: the plain C++ interface between the op glue (ms_deform_attn.cpp) and the
// kernels (ms_deform_attn_cpu.cpp, ms_deform_attn_cuda.cu). No torch types here, so nvcc compiles the CUDA file
// without torch's headers (seconds instead of minutes).
//
// Semantics (Deformable-DETR): value [N, S, M, D] with S = sum_l h_l * w_l; sampling locations [N, Q, M, L, P, 2]
// as (x, y) normalised to [0, 1]; attention weights [N, Q, M, L, P]; output [N, Q, M, D]. Bilinear, zero padding,
// align_corners=False: pixel coordinate x = loc_x * w - 0.5, rounded once (a fused multiply-add, as nvcc compiles
// the Deformable-DETR CUDA kernel); a sample counts only where -1 < x < w and -1 < y < h; at an integer x the
// location gradient is the right-hand derivative (x0 = floor(x)). Both kernels do this, so they take the
// reference's side of every kink. All tensors contiguous. Locations, weights and their gradients use the
// accumulation type (float, or double for double values); value, output and grad_output use the value type.
#pragma once

#include <cstdint>

namespace av2ts {

struct MsdaShape {
  int64_t batch;        // N
  int64_t num_values;   // S
  int64_t num_heads;    // M
  int64_t head_dim;     // D
  int64_t num_queries;  // Q
  int64_t num_levels;   // L
  int64_t num_points;   // P
};

enum class MsdaType { Float32, Float64, Float16, BFloat16 };

// CPU kernels. spatial_shapes [L, 2] (h, w) and level_start [L] are host pointers.
// Supported value types: Float32, Float64, BFloat16. The backward writes every element of its outputs; grad_value
// has the accumulation type.
void msda_forward_cpu(MsdaType type, const MsdaShape& shape, const int64_t* spatial_shapes, const int64_t* level_start,
                      const void* value, const void* locations, const void* weights, void* output);
void msda_backward_cpu(MsdaType type, const MsdaShape& shape, const int64_t* spatial_shapes,
                       const int64_t* level_start, const void* value, const void* locations, const void* weights,
                       const void* grad_output, void* grad_value, void* grad_locations, void* grad_weights);

// CUDA kernels, filled in by ms_deform_attn_cuda.cu when it is linked into the extension (null otherwise).
// spatial_shapes and level_start are device pointers; stream is a cudaStream_t. Supported value types: Float32,
// Float16, BFloat16 (locations and weights float). The backward accumulates with atomics into zeroed float buffers
// (grad_value [N, S, M, D], grad_locations, grad_weights). Both return null on success, else a CUDA error string.
struct MsdaCudaKernels {
  const char* (*forward)(MsdaType type, const MsdaShape& shape, const int64_t* spatial_shapes,
                         const int64_t* level_start, const void* value, const float* locations, const float* weights,
                         void* output, void* stream) = nullptr;
  const char* (*backward)(MsdaType type, const MsdaShape& shape, const int64_t* spatial_shapes,
                          const int64_t* level_start, const void* value, const float* locations,
                          const float* weights, const void* grad_output, float* grad_value, float* grad_locations,
                          float* grad_weights, void* stream) = nullptr;
};

MsdaCudaKernels& msda_cuda_kernels();

}  // namespace av2ts
