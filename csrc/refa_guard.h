// The error convention of the C surface in csrc/: a function returns NULL on success or a
// message allocated with malloc (freed by refa_free_error), and no C++ exception crosses the
// boundary. Shared by refa_ops.cpp and refa_dist.cpp.
#pragma once

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

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

}  // namespace refa
