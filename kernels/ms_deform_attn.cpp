// The ms_deform_attn torch ops: input checks, output allocation, dispatch to the CPU or CUDA kernels.
//
// The ops live in the namespace TORCH_EXTENSION_NAME (the build's name, which carries a hash of the sources), so
// two builds can be loaded in one process. This file needs no CUDA headers: the CUDA kernels reach it through
// msda_cuda_kernels(), and the current stream comes from c10's device-generic guard interface.
#include "ms_deform_attn.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <tuple>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME av2ts_msda
#endif
// One more macro level so TORCH_EXTENSION_NAME expands before TORCH_LIBRARY pastes it into identifiers.
#define AV2TS_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define AV2TS_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

namespace av2ts {

MsdaCudaKernels& msda_cuda_kernels() {
  static MsdaCudaKernels kernels;
  return kernels;
}

namespace {

using at::Tensor;

struct Problem {
  MsdaShape shape;
  MsdaType type;
  Tensor value, spatial_shapes, level_start, locations, weights;  // contiguous
};

MsdaType value_type(const Tensor& value) {
  switch (value.scalar_type()) {
    case at::kFloat: return MsdaType::Float32;
    case at::kDouble: return MsdaType::Float64;
    case at::kHalf: return MsdaType::Float16;
    case at::kBFloat16: return MsdaType::BFloat16;
    default: TORCH_CHECK(false, "ms_deform_attn: value must be a floating-point tensor, got ", value.scalar_type());
  }
}

Problem check_inputs(const Tensor& value, const Tensor& spatial_shapes, const Tensor& level_start,
                     const Tensor& locations, const Tensor& weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [N, S, M, D], got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be [L, 2], got ", spatial_shapes.sizes());
  const int64_t levels = spatial_shapes.size(0);
  TORCH_CHECK(level_start.dim() == 1 && level_start.size(0) == levels,
              "ms_deform_attn: level_start_index must be [L], got ", level_start.sizes());
  TORCH_CHECK(locations.dim() == 6 && locations.size(0) == value.size(0) && locations.size(2) == value.size(2) &&
                  locations.size(3) == levels && locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be [N, Q, M, L, P, 2], got ", locations.sizes(),
              " for value ", value.sizes(), " and ", levels, " levels");
  TORCH_CHECK(weights.sizes() == locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights must be [N, Q, M, L, P], got ", weights.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  const MsdaType type = value_type(value);
  const auto acc = type == MsdaType::Float64 ? at::kDouble : at::kFloat;
  TORCH_CHECK(locations.scalar_type() == acc && weights.scalar_type() == acc, "ms_deform_attn: sampling_locations ",
              "and attention_weights must be ", acc, " for ", value.scalar_type(), " values, got ",
              locations.scalar_type(), " and ", weights.scalar_type());
  const auto device = value.device();
  TORCH_CHECK(locations.device() == device && weights.device() == device && spatial_shapes.device() == device &&
                  level_start.device() == device,
              "ms_deform_attn: all tensors must be on ", device);
  Problem p;
  p.shape = {value.size(0), value.size(1),     value.size(2),    value.size(3),
             locations.size(1), levels, locations.size(4)};
  p.type = type;
  p.value = value.contiguous(), p.spatial_shapes = spatial_shapes.contiguous();
  p.level_start = level_start.contiguous(), p.locations = locations.contiguous(), p.weights = weights.contiguous();
  if (device.is_cpu()) {  // cheap on the host; the CUDA path trusts the caller rather than synchronising
    const int64_t* shapes = p.spatial_shapes.data_ptr<int64_t>();
    const int64_t* starts = p.level_start.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t l = 0; l < levels; ++l) {
      TORCH_CHECK(shapes[2 * l] > 0 && shapes[2 * l + 1] > 0 && starts[l] == total,
                  "ms_deform_attn: level ", l, " has shape (", shapes[2 * l], ", ", shapes[2 * l + 1], ") and start ",
                  starts[l], "; expected a positive shape starting at ", total);
      total += shapes[2 * l] * shapes[2 * l + 1];
    }
    TORCH_CHECK(total == p.shape.num_values, "ms_deform_attn: the levels hold ", total, " positions but value has ",
                p.shape.num_values);
  }
  return p;
}

void check_grad_output(const Problem& p, const Tensor& grad_output) {
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == p.shape.batch &&
                  grad_output.size(1) == p.shape.num_queries &&
                  grad_output.size(2) == p.shape.num_heads * p.shape.head_dim,
              "ms_deform_attn: grad_output must be [N, Q, M*D], got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == p.value.scalar_type() && grad_output.device() == p.value.device(),
              "ms_deform_attn: grad_output must match value's dtype and device");
}

Tensor forward_cpu(const Tensor& value, const Tensor& spatial_shapes, const Tensor& level_start,
                   const Tensor& locations, const Tensor& weights) {
  const Problem p = check_inputs(value, spatial_shapes, level_start, locations, weights);
  Tensor out = at::empty({p.shape.batch, p.shape.num_queries, p.shape.num_heads * p.shape.head_dim}, value.options());
  if (out.numel() > 0) {
    msda_forward_cpu(p.type, p.shape, p.spatial_shapes.data_ptr<int64_t>(), p.level_start.data_ptr<int64_t>(),
                     p.value.data_ptr(), p.locations.data_ptr(), p.weights.data_ptr(), out.data_ptr());
  }
  return out;
}

std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& value, const Tensor& spatial_shapes,
                                                const Tensor& level_start, const Tensor& locations,
                                                const Tensor& weights, const Tensor& grad_output) {
  const Problem p = check_inputs(value, spatial_shapes, level_start, locations, weights);
  check_grad_output(p, grad_output);
  // The kernel writes every element (fewer parallel regions: each costs a wake-up of the thread pool).
  Tensor grad_value = at::empty(value.sizes(), locations.options());  // accumulation type
  Tensor grad_locations = at::empty(locations.sizes(), locations.options());
  Tensor grad_weights = at::empty(weights.sizes(), weights.options());
  if (grad_output.numel() > 0) {
    const Tensor go = grad_output.contiguous();
    msda_backward_cpu(p.type, p.shape, p.spatial_shapes.data_ptr<int64_t>(), p.level_start.data_ptr<int64_t>(),
                      p.value.data_ptr(), p.locations.data_ptr(), p.weights.data_ptr(), go.data_ptr(),
                      grad_value.data_ptr(), grad_locations.data_ptr(), grad_weights.data_ptr());
  }
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

const MsdaCudaKernels& cuda_kernels_for(const Problem& p) {
  const MsdaCudaKernels& kernels = msda_cuda_kernels();
  TORCH_CHECK(kernels.forward && kernels.backward, "ms_deform_attn: this build has no CUDA kernels");
  TORCH_CHECK(p.type != MsdaType::Float64, "ms_deform_attn: float64 values are not supported on CUDA");
  return kernels;
}

void* current_stream(const at::Device& device) {
  return c10::impl::getDeviceGuardImpl(device.type())->getStream(device).native_handle();
}

Tensor forward_cuda(const Tensor& value, const Tensor& spatial_shapes, const Tensor& level_start,
                    const Tensor& locations, const Tensor& weights) {
  const Problem p = check_inputs(value, spatial_shapes, level_start, locations, weights);
  const MsdaCudaKernels& kernels = cuda_kernels_for(p);
  const c10::DeviceGuard guard(value.device());
  Tensor out = at::empty({p.shape.batch, p.shape.num_queries, p.shape.num_heads * p.shape.head_dim}, value.options());
  if (out.numel() > 0) {
    const char* error = kernels.forward(p.type, p.shape, p.spatial_shapes.data_ptr<int64_t>(),
                                        p.level_start.data_ptr<int64_t>(), p.value.data_ptr(),
                                        p.locations.data_ptr<float>(), p.weights.data_ptr<float>(), out.data_ptr(),
                                        current_stream(value.device()));
    TORCH_CHECK(error == nullptr, "ms_deform_attn forward (CUDA): ", error);
  }
  return out;
}

std::tuple<Tensor, Tensor, Tensor> backward_cuda(const Tensor& value, const Tensor& spatial_shapes,
                                                 const Tensor& level_start, const Tensor& locations,
                                                 const Tensor& weights, const Tensor& grad_output) {
  const Problem p = check_inputs(value, spatial_shapes, level_start, locations, weights);
  check_grad_output(p, grad_output);
  const MsdaCudaKernels& kernels = cuda_kernels_for(p);
  const c10::DeviceGuard guard(value.device());
  // Atomics accumulate into float buffers whatever the value type (half atomics are slow and lossy).
  Tensor grad_value = at::zeros(value.sizes(), locations.options());
  Tensor grad_locations = at::zeros(locations.sizes(), locations.options());
  Tensor grad_weights = at::zeros(weights.sizes(), weights.options());
  if (grad_output.numel() > 0) {
    const Tensor go = grad_output.contiguous();
    const char* error = kernels.backward(
        p.type, p.shape, p.spatial_shapes.data_ptr<int64_t>(), p.level_start.data_ptr<int64_t>(), p.value.data_ptr(),
        p.locations.data_ptr<float>(), p.weights.data_ptr<float>(), go.data_ptr(), grad_value.data_ptr<float>(),
        grad_locations.data_ptr<float>(), grad_weights.data_ptr<float>(), current_stream(value.device()));
    TORCH_CHECK(error == nullptr, "ms_deform_attn backward (CUDA): ", error);
  }
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace
}  // namespace av2ts

AV2TS_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
        "Tensor attention_weights) -> Tensor");
  m.def("backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
        "Tensor attention_weights, Tensor grad_output) -> (Tensor, Tensor, Tensor)");
}

AV2TS_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("forward", &av2ts::forward_cpu);
  m.impl("backward", &av2ts::backward_cpu);
}

AV2TS_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CUDA, m) {
  m.impl("forward", &av2ts::forward_cuda);
  m.impl("backward", &av2ts::backward_cuda);
}
