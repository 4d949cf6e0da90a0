// How the fused batch-norm kernels see an input: [N, C, S] either "planar" (NCHW: each (n, c) plane of S
// values contiguous) or "interleaved" (channels-last, and 2-D inputs: C contiguous channels per position).
// Shared by the CPU and CUDA kernels so both accept exactly the same layouts without copies.
#pragma once

#include <ATen/core/Tensor.h>

namespace tsbn {

inline bool is_interleaved(const at::Tensor& x) {
  if (x.dim() == 2) return true;
  if (x.is_contiguous()) return false;
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

// The dense memory format a kernel works in: x itself when it is already dense in it, else a copy.
inline at::MemoryFormat layout_of(const at::Tensor& x, bool interleaved) {
  if (!interleaved || x.dim() == 2) return at::MemoryFormat::Contiguous;
  return x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
}

}  // namespace tsbn
