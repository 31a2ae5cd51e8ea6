#include "checkpoint/zstd_lib.h"

#include <dlfcn.h>

#include <mutex>

#include "common/env.h"
#include "common/errors.h"

namespace ichiban {
namespace {

struct Loaded {
  ZstdLib lib{};
  bool ok = false;
  std::string error;
};

template <typename F>
bool bind_sym(void* h, const char* name, F& out, std::string& err) {
  void* s = dlsym(h, name);
  if (!s) {
    err = std::string("symbol ") + name + " not found in libzstd";
    return false;
  }
  out = reinterpret_cast<F>(s);
  return true;
}

Loaded load() {
  Loaded L;
  // ICHIBAN_ZSTD_LIBRARY points at a specific libzstd (e.g. from a conda env).
  std::string path = env_str("ICHIBAN_ZSTD_LIBRARY", "libzstd.so.1");
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char* e = dlerror();
    L.error = "could not load " + path + " (" + (e ? e : "unknown error") + ")";
    return L;
  }
  auto& z = L.lib;
  std::string& err = L.error;
  L.ok = bind_sym(h, "ZSTD_compressBound", z.compressBound, err) &&
         bind_sym(h, "ZSTD_createCCtx", z.createCCtx, err) &&
         bind_sym(h, "ZSTD_freeCCtx", z.freeCCtx, err) &&
         bind_sym(h, "ZSTD_compressCCtx", z.compressCCtx, err) &&
         bind_sym(h, "ZSTD_createDCtx", z.createDCtx, err) &&
         bind_sym(h, "ZSTD_freeDCtx", z.freeDCtx, err) &&
         bind_sym(h, "ZSTD_decompressDCtx", z.decompressDCtx, err) &&
         bind_sym(h, "ZSTD_isError", z.isError, err) &&
         bind_sym(h, "ZSTD_getErrorName", z.getErrorName, err) &&
         bind_sym(h, "ZSTD_versionNumber", z.versionNumber, err);
  return L;
}

const Loaded& loaded() {
  static const Loaded L = load();
  return L;
}

}  // namespace

const ZstdLib* zstd_lib() { return loaded().ok ? &loaded().lib : nullptr; }

std::string zstd_load_error() { return loaded().error; }

const ZstdLib& zstd_require() {
  const ZstdLib* z = zstd_lib();
  ICHIBAN_CHECK(z != nullptr, "zstd compression is unavailable: ", zstd_load_error(),
                ".\n---> HINT: install the zstd runtime library (Debian/Ubuntu: apt-get install "
                "libzstd1) or set ICHIBAN_ZSTD_LIBRARY to the path of libzstd.so.1");
  return *z;
}

}  // namespace ichiban
