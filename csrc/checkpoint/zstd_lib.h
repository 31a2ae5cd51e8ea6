// zstd, loaded at run time from the system's libzstd.so.1.
//
// Only the shared library is needed (it ships with nearly every Linux
// distribution; headers are not), so the build never depends on zstd and a
// machine without it gets a clear error only when compression is asked for.
#pragma once

#include <cstddef>
#include <string>

namespace ichiban {

struct ZstdLib {
  size_t (*compressBound)(size_t);
  void* (*createCCtx)();
  size_t (*freeCCtx)(void*);
  size_t (*compressCCtx)(void*, void*, size_t, const void*, size_t, int);
  void* (*createDCtx)();
  size_t (*freeDCtx)(void*);
  size_t (*decompressDCtx)(void*, void*, size_t, const void*, size_t);
  unsigned (*isError)(size_t);
  const char* (*getErrorName)(size_t);
  unsigned (*versionNumber)();
};

// The loaded library, or nullptr (then zstd_load_error() says why).
const ZstdLib* zstd_lib();
std::string zstd_load_error();

// Throws a clear error when zstd is unavailable.
const ZstdLib& zstd_require();

}  // namespace ichiban
