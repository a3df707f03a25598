// Multi-scale deformable attention on CUDA: one thread per (batch, query, head, channel), one launch per call (no
// im2col_step), 64-bit offsets, fp32 accumulation for every value type (float, half, bfloat16).
//
// The backward adds grad_value with fp32 atomics into a float buffer (half atomics are slow and lose precision).
// The location and weight gradients of a sample are sums over the head's D channels: they are reduced with warp
// shuffles when D is a power of two (the D threads of a head are neighbouring lanes), then added atomically.
//
// Only CUDA headers here: nvcc compiles this file in seconds. The kernels reach the torch op glue
// (ms_deform_attn.cpp) through msda_cuda_kernels(), filled in when the extension is loaded.
#include "ms_deform_attn.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace av2ts {
namespace {

constexpr int kThreads = 256;  // a multiple of the warp size, so heads never straddle blocks when D divides 32

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// Bilinear corners of one sample (align_corners=False, zero padding), with the arithmetic of the Deformable-DETR
// CUDA kernel the reference trains with, so both take the same side of the kinks at integer pixel coordinates:
// - x = loc_x * w - 0.5 rounded once: nvcc contracts the reference's `loc_w * spatial_w - 0.5` into fma.rn.f32 (the
//   PTX of nvcc 11.8 and 13.0); fmaf keeps it so under --fmad=false too.
// - a sample counts only where -1 < x < w and -1 < y < h (the reference's test); elsewhere, NaN included, it moves
//   to -2 or w, where all four corners are outside: no value and no gradient (at exactly -1, corner x0 + 1 = 0 has
//   weight 0 but would otherwise get a location gradient).
// - x0 = floor(x): at an integer x the sample sits on the left edge of cell [x, x + 1] and the location gradient is
//   that cell's slope, the right-hand derivative (v[x + 1] - v[x]; towards the zero padding at x = w - 1).
struct Corners {
  int x0, y0;
  float lx, ly;         // position inside the cell
  bool in[4];           // (y0, x0), (y0, x1), (y1, x0), (y1, x1) inside the map
  int64_t position[4];  // flat position of each corner within its level
};

__device__ __forceinline__ Corners locate(float loc_x, float loc_y, int h, int w) {
  float x = fmaf(loc_x, static_cast<float>(w), -0.5f), y = fmaf(loc_y, static_cast<float>(h), -0.5f);
  x = x > -1.f ? x : -2.f, y = y > -1.f ? y : -2.f;
  x = x < w ? x : static_cast<float>(w), y = y < h ? y : static_cast<float>(h);
  Corners c;
  const float x0f = floorf(x), y0f = floorf(y);
  c.x0 = static_cast<int>(x0f), c.y0 = static_cast<int>(y0f);
  c.lx = x - x0f, c.ly = y - y0f;
  const bool in_x0 = c.x0 >= 0 && c.x0 < w, in_x1 = c.x0 >= -1 && c.x0 + 1 < w;
  const bool in_y0 = c.y0 >= 0 && c.y0 < h, in_y1 = c.y0 >= -1 && c.y0 + 1 < h;
  c.in[0] = in_y0 && in_x0, c.in[1] = in_y0 && in_x1, c.in[2] = in_y1 && in_x0, c.in[3] = in_y1 && in_x1;
  const int64_t p = static_cast<int64_t>(c.y0) * w + c.x0;
  c.position[0] = p, c.position[1] = p + 1, c.position[2] = p + w, c.position[3] = p + w + 1;
  return c;
}

// Indices of thread t = ((n * Q + q) * M + m) * D + d.
struct ThreadIndex {
  int64_t d, head_query;  // head_query = (n * Q + q) * M + m
  int64_t m, n;
};

__device__ __forceinline__ ThreadIndex split(const MsdaShape& s, int64_t t) {
  ThreadIndex i;
  i.d = t % s.head_dim, i.head_query = t / s.head_dim;
  i.m = i.head_query % s.num_heads, i.n = i.head_query / s.num_heads / s.num_queries;
  return i;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const MsdaShape s, const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                   const T* __restrict__ value, const float* __restrict__ locations,
                   const float* __restrict__ weights, T* __restrict__ output, const int64_t total) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= total) return;
  const ThreadIndex i = split(s, t);
  const int64_t row_stride = s.num_heads * s.head_dim, per_head = s.num_levels * s.num_points;
  const T* v = value + i.n * s.num_values * row_stride + i.m * s.head_dim + i.d;
  const float* loc = locations + i.head_query * per_head * 2;
  const float* attn = weights + i.head_query * per_head;
  float acc = 0.f;
  for (int64_t l = 0; l < s.num_levels; ++l) {
    const int h = static_cast<int>(shapes[2 * l]), w = static_cast<int>(shapes[2 * l + 1]);
    const T* v_level = v + starts[l] * row_stride;
    for (int64_t p = 0; p < s.num_points; ++p) {
      const int64_t k = l * s.num_points + p;
      const Corners c = locate(loc[2 * k], loc[2 * k + 1], h, w);
      const float hx = 1.f - c.lx, hy = 1.f - c.ly;
      const float bilinear[4] = {hy * hx, hy * c.lx, c.ly * hx, c.ly * c.lx};
      float sample = 0.f;
#pragma unroll
      for (int corner = 0; corner < 4; ++corner) {
        if (c.in[corner]) sample += bilinear[corner] * to_float(v_level[c.position[corner] * row_stride]);
      }
      acc += attn[k] * sample;
    }
  }
  output[t] = from_float<T>(acc);
}

// Sum of v over aligned groups of `group` lanes (a power of two <= 32); every lane of the warp must call it.
__device__ __forceinline__ float group_sum(float v, int group) {
  for (int offset = group / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const MsdaShape s, const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                    const T* __restrict__ value, const float* __restrict__ locations,
                    const float* __restrict__ weights, const T* __restrict__ grad_output,
                    float* __restrict__ grad_value, float* __restrict__ grad_locations,
                    float* __restrict__ grad_weights, const int64_t total, const int group) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  // Threads past the end still take part in the shuffles, with a zero gradient and no writes.
  const bool active = t < total;
  const ThreadIndex i = split(s, active ? t : total - 1);
  const bool writer = active && i.d % group == 0;
  const float go = active ? to_float(grad_output[t]) : 0.f;
  const int64_t row_stride = s.num_heads * s.head_dim, per_head = s.num_levels * s.num_points;
  const int64_t head_offset = i.n * s.num_values * row_stride + i.m * s.head_dim + i.d;
  const T* v = value + head_offset;
  float* gv = grad_value + head_offset;
  const float* loc = locations + i.head_query * per_head * 2;
  const float* attn = weights + i.head_query * per_head;
  for (int64_t l = 0; l < s.num_levels; ++l) {
    const int h = static_cast<int>(shapes[2 * l]), w = static_cast<int>(shapes[2 * l + 1]);
    const int64_t level_offset = starts[l] * row_stride;
    for (int64_t p = 0; p < s.num_points; ++p) {
      const int64_t k = l * s.num_points + p;
      const Corners c = locate(loc[2 * k], loc[2 * k + 1], h, w);
      const float a = attn[k], hx = 1.f - c.lx, hy = 1.f - c.ly;
      const float bilinear[4] = {hy * hx, hy * c.lx, c.ly * hx, c.ly * c.lx};
      float corner_value[4];
#pragma unroll
      for (int corner = 0; corner < 4; ++corner) {
        corner_value[corner] = 0.f;
        if (!c.in[corner]) continue;
        const int64_t offset = level_offset + c.position[corner] * row_stride;
        corner_value[corner] = to_float(v[offset]);
        if (active) atomicAdd(gv + offset, a * bilinear[corner] * go);
      }
      // x = loc_x * w - 0.5, so d/dloc_x = w * d/dx (and likewise for y); the slope of the cell right of x0, so at an
      // integer x the right-hand derivative (see locate)
      float grad_a = go * (bilinear[0] * corner_value[0] + bilinear[1] * corner_value[1] +
                           bilinear[2] * corner_value[2] + bilinear[3] * corner_value[3]);
      float grad_x = go * a * w * (hy * (corner_value[1] - corner_value[0]) + c.ly * (corner_value[3] - corner_value[2]));
      float grad_y = go * a * h * (hx * (corner_value[2] - corner_value[0]) + c.lx * (corner_value[3] - corner_value[1]));
      grad_a = group_sum(grad_a, group), grad_x = group_sum(grad_x, group), grad_y = group_sum(grad_y, group);
      if (writer) {
        const int64_t sample = i.head_query * per_head + k;
        atomicAdd(grad_weights + sample, grad_a);
        atomicAdd(grad_locations + 2 * sample, grad_x);
        atomicAdd(grad_locations + 2 * sample + 1, grad_y);
      }
    }
  }
}

int64_t blocks_for(int64_t total) { return (total + kThreads - 1) / kThreads; }

const char* last_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

const char* launch_forward(MsdaType type, const MsdaShape& s, const int64_t* shapes, const int64_t* starts,
                           const void* value, const float* locations, const float* weights, void* output,
                           void* stream) {
  const int64_t total = s.batch * s.num_queries * s.num_heads * s.head_dim;
  const dim3 grid(static_cast<unsigned>(blocks_for(total)));
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (type) {
    case MsdaType::Float32:
      forward_kernel<float><<<grid, kThreads, 0, st>>>(s, shapes, starts, static_cast<const float*>(value), locations,
                                                       weights, static_cast<float*>(output), total);
      break;
    case MsdaType::Float16:
      forward_kernel<__half><<<grid, kThreads, 0, st>>>(s, shapes, starts, static_cast<const __half*>(value),
                                                        locations, weights, static_cast<__half*>(output), total);
      break;
    case MsdaType::BFloat16:
      forward_kernel<__nv_bfloat16><<<grid, kThreads, 0, st>>>(s, shapes, starts,
                                                               static_cast<const __nv_bfloat16*>(value), locations,
                                                               weights, static_cast<__nv_bfloat16*>(output), total);
      break;
    default:
      return "unsupported value dtype";
  }
  return last_error();
}

const char* launch_backward(MsdaType type, const MsdaShape& s, const int64_t* shapes, const int64_t* starts,
                            const void* value, const float* locations, const float* weights, const void* grad_output,
                            float* grad_value, float* grad_locations, float* grad_weights, void* stream) {
  const int64_t total = s.batch * s.num_queries * s.num_heads * s.head_dim;
  const bool power_of_two = (s.head_dim & (s.head_dim - 1)) == 0;
  const int group = power_of_two ? static_cast<int>(s.head_dim < 32 ? s.head_dim : 32) : 1;
  const dim3 grid(static_cast<unsigned>(blocks_for(total)));
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (type) {
    case MsdaType::Float32:
      backward_kernel<float><<<grid, kThreads, 0, st>>>(
          s, shapes, starts, static_cast<const float*>(value), locations, weights,
          static_cast<const float*>(grad_output), grad_value, grad_locations, grad_weights, total, group);
      break;
    case MsdaType::Float16:
      backward_kernel<__half><<<grid, kThreads, 0, st>>>(
          s, shapes, starts, static_cast<const __half*>(value), locations, weights,
          static_cast<const __half*>(grad_output), grad_value, grad_locations, grad_weights, total, group);
      break;
    case MsdaType::BFloat16:
      backward_kernel<__nv_bfloat16><<<grid, kThreads, 0, st>>>(
          s, shapes, starts, static_cast<const __nv_bfloat16*>(value), locations, weights,
          static_cast<const __nv_bfloat16*>(grad_output), grad_value, grad_locations, grad_weights, total, group);
      break;
    default:
      return "unsupported value dtype";
  }
  return last_error();
}

// Hand the launchers to the op glue when the extension is loaded.
const bool registered = [] {
  MsdaCudaKernels& kernels = msda_cuda_kernels();
  kernels.forward = &launch_forward;
  kernels.backward = &launch_backward;
  return true;
}();

}  // namespace
}  // namespace av2ts
