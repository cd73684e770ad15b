// What the two files of the C surface in csrc/ share: its error convention (a function
// returns NULL on success or a message allocated with malloc, freed by refa_free_error, and
// no C++ exception crosses the boundary), and reading tch's tensor-pointer arrays.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace refa {

// A malloc'ed copy of `message` (NULL if the allocation fails).
inline char* copy_message(const std::string& message) {
  char* copy = static_cast<char*>(std::malloc(message.size() + 1));
  if (copy != nullptr) {
    std::memcpy(copy, message.c_str(), message.size() + 1);
  }
  return copy;
}

// Runs `body`; NULL when it returns, the exception's message when it throws.
template <typename F>
char* guarded(F&& body) {
  try {
    body();
    return nullptr;
  } catch (const std::exception& e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message("unknown C++ exception in refa-loss's csrc");
  }
}

// The tensors behind tch's `count` pointers (handles sharing their storage).
inline std::vector<at::Tensor> gather(at::Tensor** tensors, size_t count) {
  std::vector<at::Tensor> out;
  out.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    out.push_back(*tensors[i]);
  }
  return out;
}

}  // namespace refa
