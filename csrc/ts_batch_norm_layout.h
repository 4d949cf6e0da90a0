// How the fused batch-norm kernels see an input: [N, C, S] either "planar" (NCHW: each (n, c) plane of S
// values contiguous) or "interleaved" (channels-last, 2-D inputs, and 3-D [N, C, L] views of a [N, L, C]
// tensor — what x.transpose(1, 2) of a sequence gives BatchNorm1d: C contiguous channels per position).
// Shared by the CPU and CUDA kernels so both accept exactly the same layouts without copies.
#pragma once

#include <ATen/core/Tensor.h>

namespace tsbn {

inline bool is_interleaved(const at::Tensor& x) {
  if (x.dim() == 2) return true;
  if (x.is_contiguous()) return false;
  if (x.dim() == 3) return x.transpose(1, 2).is_contiguous();
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

// t dense in the layout the kernels read (x's, given by interleaved): t itself when it already is, else a
// copy. Outputs made with empty_like of the result keep that layout, so a channel-minor input gives a
// channel-minor output, as eager batch norm does. 3-D has no at::MemoryFormat for it, hence the transposes.
inline at::Tensor in_layout(const at::Tensor& t, bool interleaved) {
  if (!interleaved || t.dim() == 2) return t.contiguous();
  if (t.dim() == 3) return t.transpose(1, 2).contiguous().transpose(1, 2);
  return t.contiguous(t.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d);
}

}  // namespace tsbn
