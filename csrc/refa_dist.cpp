// Data-parallel collectives on libtorch's own distributed engine (c10d), behind the same kind
// of small C surface as refa_ops.cpp: a process group made from a TCPStore, with Gloo for CPU
// tensors and, when compiled with USE_C10D_NCCL, NCCL for CUDA tensors.
//
// Every function returns NULL on success or an error message allocated with malloc (free it
// with refa_free_error from refa_ops.cpp); no C++ exception crosses this boundary: a timeout,
// a lost peer or a closed connection comes back as that message. Tensors are `at::Tensor*`
// (tch's C_tensor). src/distributed.rs is the only caller and repeats each contract.

#include <ATen/ATen.h>
#include "refa_guard.h"
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

using refa::copy_message;
using refa::gather;
using refa::guarded;

// One process group: the store it met its peers through, and one backend per device type.
struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> gloo;
  c10::intrusive_ptr<c10d::Backend> nccl;  // null unless built with NCCL and asked for
  int rank;
  int world;
  std::chrono::milliseconds timeout;

  c10d::Backend& backend_for(const at::Tensor& tensor) {
    if (tensor.is_cuda()) {
      if (!nccl) {
        throw std::runtime_error(
            "a CUDA tensor in a process group without NCCL (built without it, or not asked "
            "for)");
      }
      return *nccl;
    }
    return *gloo;
  }

  // Waits for a collective. Gloo's run on the host: wait with the timeout. NCCL's run on
  // the GPU: wait() without a timeout only orders the current CUDA stream after the
  // collective and returns (with a timeout it would block the host until the kernel ends,
  // draining the GPU's queue at every bucket); a hang is caught by the next Gloo collective
  // (each training step ends with one) and by NCCL's own watchdog after the group timeout.
  void run(const c10::intrusive_ptr<c10d::Work>& work, const at::Tensor& on) {
    if (on.defined() && on.is_cuda()) {
      work->wait();
      return;
    }
    if (!work->wait(timeout)) {
      throw std::runtime_error("the collective did not complete");
    }
  }
};

Group& group_of(void* handle) { return *static_cast<Group*>(handle); }

// A process started with the MASTER_PORT of another, running job meets that job's store.
// Its index is taken there, or the job's world size is another, so it stops here at once,
// before it writes a key of that job's rendezvous (where it would wait far past the timeout
// and could disturb the job). Each rank claims its index once; the first sets the size.
void check_membership(c10d::Store& store, int rank, int world) {
  const std::string mine = std::to_string(world);
  const std::string stored = store.compareSet("world", "", mine);
  if (stored != mine) {
    throw std::runtime_error("the job at this address has WORLD_SIZE " + stored +
                             ", this process was started with " + mine +
                             ": another job uses this MASTER_PORT");
  }
  if (store.add("rank/" + std::to_string(rank), 1) > 1) {
    throw std::runtime_error("rank " + std::to_string(rank) +
                             " has already joined the job at this address: another job uses "
                             "this MASTER_PORT, or this rank was started twice");
  }
}

}  // namespace

extern "C" {

// Whether this build can make NCCL process groups.
int refa_dist_has_nccl() {
#ifdef USE_C10D_NCCL
  return 1;
#else
  return 0;
#endif
}

// Meets the `world` processes of a job through a TCPStore at host:port (served by this
// process when is_server, else by rank 0 or by torchrun's agent), under the key prefix
// `prefix` (so that a restarted job does not read an earlier attempt's keys), and makes a
// Gloo backend, plus an NCCL one when use_nccl. Every collective and the rendezvous itself
// fail after timeout_ms. On success *out holds the group (free it with refa_dist_free).
char* refa_dist_new(const char* host, int port, int is_server, int rank, int world,
                    int64_t timeout_ms, const char* prefix, int use_nccl, void** out) {
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions options;
    options.port = static_cast<uint16_t>(port);
    options.isServer = is_server != 0;
    options.numWorkers = world;
    options.waitWorkers = false;
    options.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    check_membership(*store, rank, world);
    auto group = std::make_unique<Group>();
    group->store = store;
    group->rank = rank;
    group->world = world;
    group->timeout = timeout;
    auto gloo_options = c10d::ProcessGroupGloo::Options::create();
    gloo_options->timeout = timeout;
    gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    group->gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(
        c10::make_intrusive<c10d::PrefixStore>("gloo", store), rank, world, gloo_options);
    if (use_nccl != 0) {
#ifdef USE_C10D_NCCL
      auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
      nccl_options->timeout = timeout;
      group->nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(
          c10::make_intrusive<c10d::PrefixStore>("nccl", store), rank, world, nccl_options);
#else
      throw std::runtime_error("this build of refa-loss has no NCCL (see build.rs)");
#endif
    }
    *out = group.release();
  });
}

void refa_dist_free(void* handle) { delete static_cast<Group*>(handle); }

// In place on every tensor (all of one kind on one device): the element-wise sum over the
// ranks, divided by the number of ranks when average. Several tensors travel as one flat
// buffer: one collective (the backends read a list as one tensor per device).
char* refa_dist_all_reduce(void* handle, at::Tensor** tensors, size_t count, int average) {
  return guarded([&] {
    if (count == 0) return;
    Group& group = group_of(handle);
    std::vector<at::Tensor> list = gather(tensors, count);
    std::vector<at::Tensor> flat_parts;
    for (auto& tensor : list) {
      flat_parts.push_back(tensor.reshape({-1}));
    }
    at::Tensor flat = count == 1 && list[0].is_contiguous() ? flat_parts[0] : at::cat(flat_parts);
    std::vector<at::Tensor> one{flat};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    options.timeout = group.timeout;
    group.run(group.backend_for(flat).allreduce(one, options), flat);
    if (average != 0) {
      flat.div_(group.world);
    }
    if (!(count == 1 && list[0].is_contiguous())) {
      int64_t offset = 0;
      for (auto& tensor : list) {
        int64_t n = tensor.numel();
        tensor.copy_(flat.narrow(0, offset, n).view(tensor.sizes()));
        offset += n;
      }
    }
  });
}

// In place on every tensor: rank `root`'s values.
char* refa_dist_broadcast(void* handle, at::Tensor** tensors, size_t count, int root) {
  return guarded([&] {
    if (count == 0) return;
    Group& group = group_of(handle);
    std::vector<at::Tensor> list = gather(tensors, count);
    c10d::BroadcastOptions options;
    options.rootRank = root;
    options.rootTensor = 0;
    options.timeout = group.timeout;
    // One tensor per call: the backends take a list as one tensor per device.
    for (auto& tensor : list) {
      std::vector<at::Tensor> one{tensor};
      group.run(group.backend_for(tensor).broadcast(one, options), tensor);
    }
  });
}

// output (n elements) = the rank-th of the `world` equal slices of the sum (or average) of
// every rank's input (world * n elements, contiguous). Where the backend has no
// reduce-scatter, an all-reduce of a copy gives the same result with twice the traffic.
char* refa_dist_reduce_scatter(void* handle, at::Tensor* output, at::Tensor* input,
                               int average) {
  return guarded([&] {
    Group& group = group_of(handle);
    if (input->numel() != output->numel() * group.world) {
      throw std::runtime_error("reduce-scatter: the input must hold world x output elements");
    }
    at::Tensor flat = input->contiguous().view({-1});
    std::vector<at::Tensor> slices = flat.chunk(group.world);
    c10d::ReduceScatterOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    options.timeout = group.timeout;
    std::vector<at::Tensor> outputs{output->view({-1})};
    std::vector<std::vector<at::Tensor>> inputs{slices};
    try {
      group.run(group.backend_for(*output).reduce_scatter(outputs, inputs, options), *output);
    } catch (const c10::NotImplementedError&) {
      at::Tensor sum = flat.clone();
      std::vector<at::Tensor> list{sum};
      c10d::AllreduceOptions all;
      all.reduceOp = c10d::ReduceOp::SUM;
      all.timeout = group.timeout;
      group.run(group.backend_for(sum).allreduce(list, all), sum);
      output->view({-1}).copy_(sum.chunk(group.world)[group.rank]);
    }
    if (average != 0) {
      output->div_(group.world);
    }
  });
}

// output (world * n elements, contiguous) = every rank's input (n elements), in rank order.
char* refa_dist_all_gather(void* handle, at::Tensor* output, at::Tensor* input) {
  return guarded([&] {
    Group& group = group_of(handle);
    if (output->numel() != input->numel() * group.world || !output->is_contiguous()) {
      throw std::runtime_error("all-gather: the output must be contiguous, world x input");
    }
    std::vector<std::vector<at::Tensor>> outputs{output->view({-1}).chunk(group.world)};
    std::vector<at::Tensor> inputs{input->contiguous().view({-1})};
    c10d::AllgatherOptions options;
    options.timeout = group.timeout;
    group.run(group.backend_for(*input).allgather(outputs, inputs, options), *input);
  });
}

// Returns when every rank has called it (over Gloo, whatever the tensors' devices).
char* refa_dist_barrier(void* handle) {
  return guarded([&] {
    Group& group = group_of(handle);
    c10d::BarrierOptions options;
    options.timeout = group.timeout;
    group.run(group.gloo->barrier(options), at::Tensor());
  });
}

// Stores `value` under `key` in the job's store.
char* refa_dist_store_set(void* handle, const char* key, const char* value) {
  return guarded([&] {
    std::string text(value);
    group_of(handle).store->set(std::string(key), std::vector<uint8_t>(text.begin(), text.end()));
  });
}

// *value = the text stored under `key` (malloc'ed; free with refa_free_error), waiting for it
// at most timeout_ms.
char* refa_dist_store_get(void* handle, const char* key, int64_t timeout_ms, char** value) {
  return guarded([&] {
    Group& group = group_of(handle);
    std::vector<std::string> keys{std::string(key)};
    group.store->wait(keys, std::chrono::milliseconds(timeout_ms));
    std::vector<uint8_t> bytes = group.store->get(keys[0]);
    *value = copy_message(std::string(bytes.begin(), bytes.end()));
  });
}

}  // extern "C"
