// The few libtorch operations tch 0.24 does not bind, behind a small C surface.
//
// Every function returns NULL on success or an error message allocated with malloc (free it
// with refa_free_error); no C++ exception crosses this boundary. Tensors are passed as
// `at::Tensor*`, the representation tch's C_tensor pointers have. The declarations and their
// contracts are repeated in src/ffi.rs, the only caller.

#include <ATen/ATen.h>
#include "refa_guard.h"
#include <ATen/DeviceAccelerator.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <vector>

namespace {

using refa::gather;
using refa::guarded;

}  // namespace

extern "C" {

void refa_free_error(char* message) { std::free(message); }

// One AdamW step over `count` parameters with libtorch's fused multi-tensor kernel
// (at::_fused_adamw_, CPU and CUDA).
//
// targets[i]: the f32/f64 tensor that receives the update (a parameter, or the master copy
//   of a low-precision parameter); grads[i]: its gradient in any floating kind (cast to the
//   target's kind when it differs); exp_avgs[i], exp_avg_sqs[i]: the moments, of the target's
//   kind; mirrors[i]: NULL, or the low-precision parameter that gets the updated master
//   rounded into it; steps[i]: a 0-dim float tensor on the target's device holding the step
//   number, already incremented by the caller (parameters may share one). found_inf: NULL,
//   or a 0-dim float tensor on the targets' device; where it holds a non-zero value the
//   kernel leaves every target and moment unchanged: a step skipped on the device, without
//   a host synchronization (as PyTorch's GradScaler skips steps). Afterwards every gradient
//   is set to zero.
char* refa_adamw_step(at::Tensor** targets, at::Tensor** grads, at::Tensor** exp_avgs,
                      at::Tensor** exp_avg_sqs, at::Tensor** mirrors, at::Tensor** steps,
                      size_t count, double lr, double beta1, double beta2, double weight_decay,
                      double eps, at::Tensor* found_inf) {
  return guarded([&] {
    // The fused kernel wants one device and one kind per call: group the parameters.
    struct Group {
      std::vector<at::Tensor> targets, grads, exp_avgs, exp_avg_sqs, steps;
    };
    std::map<std::pair<int, int>, Group> groups;
    std::vector<at::Tensor> all_grads, mirror_targets, mirror_params;
    for (size_t i = 0; i < count; ++i) {
      const at::Tensor& target = *targets[i];
      const at::Tensor& grad = *grads[i];
      all_grads.push_back(grad);
      auto key = std::make_pair(static_cast<int>(target.device().type()) * 1024 +
                                    target.device().index(),
                                static_cast<int>(target.scalar_type()));
      Group& group = groups[key];
      group.targets.push_back(target);
      group.grads.push_back(grad.scalar_type() == target.scalar_type()
                                ? grad
                                : grad.to(target.scalar_type()));
      group.exp_avgs.push_back(*exp_avgs[i]);
      group.exp_avg_sqs.push_back(*exp_avg_sqs[i]);
      group.steps.push_back(*steps[i]);
      if (mirrors[i] != nullptr) {
        mirror_params.push_back(*mirrors[i]);
        mirror_targets.push_back(target);
      }
    }
    std::optional<at::Tensor> skip;
    if (found_inf != nullptr) {
      skip = *found_inf;
    }
    for (auto& entry : groups) {
      Group& g = entry.second;
      at::_fused_adamw_(g.targets, g.grads, g.exp_avgs, g.exp_avg_sqs, at::TensorList(), g.steps, lr, beta1,
                        beta2, weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false,
                        /*grad_scale=*/std::nullopt, skip);
    }
    // A skipped step leaves the masters as they were, so the copy is harmless then.
    if (!mirror_params.empty()) {
      at::_foreach_copy_(mirror_params, mirror_targets, /*non_blocking=*/false);
    }
    if (!all_grads.empty()) {
      at::_foreach_zero_(all_grads);
    }
  });
}

// The global L2 norm of `count` gradients, computed on their device in f32 with the
// multi-tensor kernels (at::_foreach_norm), and, when max_norm > 0, the gradients scaled in
// place by min(1, max_norm / (norm + 1e-6)) (at::_foreach_mul_). No host synchronization.
// *norm_out receives a new 0-dim f32 tensor (owned by the caller, freed as tch frees its
// tensors); with no gradient it holds 0.
char* refa_clip_grad_norm(at::Tensor** grads, size_t count, double max_norm,
                          at::Tensor** norm_out) {
  return guarded([&] {
    std::vector<at::Tensor> list = gather(grads, count);
    if (list.empty()) {
      *norm_out = new at::Tensor(at::zeros({}, at::kFloat));
      return;
    }
    // Gradients may sit on several devices (model parallelism): one norm per device group
    // would be needed then; the trainer keeps one device, which this checks.
    const at::Device device = list.front().device();
    for (const at::Tensor& g : list) {
      TORCH_CHECK(g.device() == device, "refa_clip_grad_norm: gradients on ", device, " and ",
                  g.device());
    }
    std::vector<at::Tensor> norms = at::_foreach_norm(list, 2, at::kFloat);
    at::Tensor total = at::linalg_vector_norm(at::stack(norms), 2);
    if (max_norm > 0.0) {
      at::Tensor scale = (max_norm / (total + 1e-6)).clamp_max(1.0);
      // Each gradient keeps its kind: one multiplication per kind, by the scale in that kind.
      std::map<int, std::vector<at::Tensor>> by_kind;
      for (const at::Tensor& g : list) {
        by_kind[static_cast<int>(g.scalar_type())].push_back(g);
      }
      for (auto& entry : by_kind) {
        at::_foreach_mul_(entry.second, scale.to(entry.second.front().scalar_type()));
      }
    }
    *norm_out = new at::Tensor(total);
  });
}

// *out = a page-locked copy of the host tensor `host`, for asynchronous uploads: libtorch's
// pin_memory() without the device argument tch always passes, which libtorch 2.11 deprecates
// with a warning printed at every call.
char* refa_pin_memory(at::Tensor* host, at::Tensor** out) {
  return guarded([&] { *out = new at::Tensor(host->pin_memory()); });
}

// The caching allocator's statistics of accelerator device `index`, in bytes:
// out[0] allocated now, out[1] peak allocated, out[2] reserved now, out[3] peak reserved,
// out[4] free device memory, out[5] total device memory. *available is set to 0 (and out
// left alone) when no accelerator is present.
char* refa_memory_stats(int index, int64_t* out, int* available) {
  return guarded([&] {
    *available = 0;
    auto accelerator = at::accelerator::getAccelerator(false);
    if (!accelerator.has_value() || at::accelerator::deviceCount() == 0) {
      return;
    }
    const auto device = static_cast<c10::DeviceIndex>(index);
    const auto stats = at::accelerator::getDeviceStats(device);
    const size_t aggregate = 0;  // StatType::AGGREGATE
    out[0] = stats.allocated_bytes[aggregate].current;
    out[1] = stats.allocated_bytes[aggregate].peak;
    out[2] = stats.reserved_bytes[aggregate].current;
    out[3] = stats.reserved_bytes[aggregate].peak;
    const auto memory = at::accelerator::getMemoryInfo(device);
    out[4] = static_cast<int64_t>(memory.first);
    out[5] = static_cast<int64_t>(memory.second);
    *available = 1;
  });
}

// Resets the peak statistics of accelerator device `index` (a no-op without one).
char* refa_reset_peak_memory(int index) {
  return guarded([&] {
    auto accelerator = at::accelerator::getAccelerator(false);
    if (!accelerator.has_value() || at::accelerator::deviceCount() == 0) {
      return;
    }
    at::accelerator::resetPeakStats(static_cast<c10::DeviceIndex>(index));
  });
}

// Variable-length attention over packed sequences with libtorch's FlashAttention-2 kernel
// (at::_flash_attention_forward with cumulative lengths). Called through the dispatcher, so
// autograd records FlashAttentionBackward0 (libtorch 2.11: torch/csrc/autograd/generated/
// Functions.h; it saves the cumulative lengths, the window and the logsumexp and calls
// at::_flash_attention_backward): the returned tensor back-propagates from Rust like any
// other, and no backward is bound here.
//
// q: [total_q, heads, d]; k, v: [total_k, kv_heads, d], heads a multiple of kv_heads (the
//   kernel shares each key/value head among its query heads in place); CUDA, bf16 or f16,
//   d a multiple of 8 and at most 256; the last dimension contiguous (made so if not).
// cum_q, cum_k: int32 [S + 1] on q's device, the cumulative lengths of the S query and key
//   sequences (sequence s: queries cum_q[s]..cum_q[s+1], keys cum_k[s]..cum_k[s+1]); key
//   sequences may be longer than their query sequences (a prompt's keys before a response's).
// max_q, max_k: the longest query and key sequence.
// causal != 0: query i of a sequence of len_q queries and len_k keys sees keys up to
//   i + len_k - len_q (the mask aligned to the end, FlashAttention-2's convention).
// scale: the factor on q·kᵀ; 0 or less for 1/sqrt(d).
// window_left: >= 0: a query also sees no key more than window_left positions before it
//   (a sliding window of window_left + 1 keys, itself included); -1: no window.
// *out receives a new tensor [total_q, heads, d] (owned by the caller).
char* refa_flash_attention_varlen(at::Tensor* q, at::Tensor* k, at::Tensor* v,
                                  at::Tensor* cum_q, at::Tensor* cum_k, int64_t max_q,
                                  int64_t max_k, int causal, double scale, int64_t window_left,
                                  at::Tensor** out) {
  return guarded([&] {
    for (const at::Tensor* t : {q, k, v, cum_q, cum_k}) {
      TORCH_CHECK(t->is_cuda(),
                  "refa_flash_attention_varlen: the variable-length flash kernel runs on CUDA "
                  "only, got a tensor on ", t->device(),
                  " (the packed layout's block-diagonal path serves other devices)");
    }
    const auto kind = q->scalar_type();
    TORCH_CHECK(kind == at::kBFloat16 || kind == at::kHalf,
                "refa_flash_attention_varlen: the flash kernel takes bf16 or f16, got ", kind,
                " (the block-diagonal path serves f32)");
    TORCH_CHECK(q->dim() == 3 && k->dim() == 3 && v->dim() == 3,
                "refa_flash_attention_varlen: q, k, v must be [tokens, heads, head_dim], got ",
                q->sizes(), ", ", k->sizes(), ", ", v->sizes());
    TORCH_CHECK(cum_q->scalar_type() == at::kInt && cum_k->scalar_type() == at::kInt &&
                    cum_q->numel() == cum_k->numel() && cum_q->numel() >= 2,
                "refa_flash_attention_varlen: cum_q and cum_k must be int32 [S + 1] with S >= 1");
    auto last_contiguous = [](const at::Tensor& t) {
      return t.stride(-1) == 1 ? t : t.contiguous();
    };
    std::optional<double> softmax_scale;
    if (scale > 0.0) {
      softmax_scale = scale;
    }
    std::optional<int64_t> left;
    if (window_left >= 0) {
      left = window_left;
    }
    auto result = at::_flash_attention_forward(
        last_contiguous(*q), last_contiguous(*k), last_contiguous(*v), *cum_q, *cum_k, max_q,
        max_k, /*dropout_p=*/0.0, /*is_causal=*/causal != 0, /*return_debug_mask=*/false,
        softmax_scale, left, /*window_size_right=*/std::nullopt);
    *out = new at::Tensor(std::get<0>(result));
  });
}

}  // extern "C"
